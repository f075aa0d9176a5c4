"""Paper-size StarGAN models (docs/models.md): lean versions and the official layout they
replace."""

from vcfast.models.convert import convert_stargan
from vcfast.models.discriminator import StarGANDiscriminator
from vcfast.models.generator import StarGANGenerator, inference_mode
from vcfast.models.official import OfficialDiscriminator, OfficialGenerator, OfficialResidualBlock

__all__ = [
    "OfficialDiscriminator",
    "OfficialGenerator",
    "OfficialResidualBlock",
    "StarGANDiscriminator",
    "StarGANGenerator",
    "convert_stargan",
    "inference_mode",
]
