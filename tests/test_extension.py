"""`import vcfast` without the compiled extension: a clear message, and the pure-PyTorch
backends keep working."""

import subprocess
import sys
import textwrap


def test_import_without_extension_falls_back_to_reference():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["vcfast._C"] = None  # makes `import vcfast._C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vcfast
        messages = [str(w.message) for w in caught]
        assert any("vcfast._C could not be loaded" in m and "'reference'" in m
                   for m in messages), messages
        b = vcfast.backends()
        assert b["reference"] and not b["cpu"] and not b["cuda"], b
        import torch
        y = vcfast.log_spectrogram(torch.rand(4096) - 0.5)   # default falls back to reference
        assert y.shape == (256, 13)
        try:
            vcfast.log_spectrogram(torch.rand(4096), backend="cpu")
        except RuntimeError as exc:
            assert "needs the compiled extension" in str(exc)
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
