"""Paper-size StarGAN models (SPEC §4)."""

from vcfast.models.discriminator import StarGANDiscriminator

__all__ = ["StarGANDiscriminator"]
