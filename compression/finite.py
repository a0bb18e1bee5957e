"""Whether a tensor holds only finite numbers, in one read-only pass.

``torch.isfinite(t).all()`` builds boolean temporaries the size of ``t`` over several elementwise passes: 0.3 ms for
a 576 x 576 float64 matrix and 28 ms for a 2048 x 5632 bfloat16 weight on 2 CPU cores, against 0.03 and 0.3 ms for a
sum (measured once, best of 50).  A sum is NaN or infinite whenever one of its terms is (NaN propagates, an infinity
plus anything finite stays infinite, opposite infinities give NaN), so a finite sum proves every element finite.
The converse fails only when finite elements overflow the sum's dtype (float64: past 1e308; half-precision inputs
are summed in float32); then the elementwise test decides.  The decomposition checks every matrix it reads and
writes this way, and the streamed mode every weight it loads.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``, in one pass unless a sum of finite values overflows (module docstring)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in _HALF else t.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())
