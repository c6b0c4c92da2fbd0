"""Without a compiled prefkernels._C, the package imports and runs on the reference backend
with exactly one warning that says why."""
import subprocess
import sys

SCRIPT = r'''
import importlib.abc, sys, warnings

class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prefkernels._C":  # as when the .so is missing
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockExtension())
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import prefkernels  # the warning comes at import, where the backends are loaded
    from prefkernels import reference

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, 8, generator=g)
    weight = torch.randn(2, 8, generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)
    loss, rewards = prefkernels.fused_bt_loss(hidden, weight, attention_mask=mask)
    prefkernels.pool_score(hidden, weight, attention_mask=mask)
messages = [str(w.message) for w in caught]
assert len(messages) == 1, messages
assert "prefkernels._C" in messages[0] and "reference" in messages[0] and "pip install" in messages[0], messages
assert "No module named 'prefkernels._C'" in messages[0], messages  # the real reason, not "partially initialized"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    prefkernels.pool_score(hidden, weight, attention_mask=mask, backend="native")
messages = [str(w.message) for w in caught]
assert len(messages) == 1 and "'native' is unavailable" in messages[0] and "not built" in messages[0], messages
want, _ = reference.fused_bt_loss(hidden, weight, attention_mask=mask)
assert torch.equal(loss, want), (loss, want)
print("ok")
'''


def test_missing_extension_falls_back_to_reference_with_one_warning():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
