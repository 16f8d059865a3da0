"""Signal models of the synthetic pulse sequences: how a tissue's PD, T1 and T2 become intensity.

A sequence maps one tissue's relaxation parameters to its (noise-free, magnitude) signal:

    SpinEcho            PD (1 - exp(-TR/T1)) exp(-TE/T2), optionally with spectral fat saturation
    InversionRecovery   PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2) (magnitude image, as
                        FLAIR is reconstructed; TI near T1_csf ln 2 nulls the CSF)

Times are in ms. The phantoms sum these signals over their tissue fractions.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["InversionRecovery", "Sequence", "SpinEcho", "spin_echo"]


def spin_echo(pd: float, t1: float, t2: float, tr: float, te: float) -> float:
    """Spin-echo signal `PD (1 - exp(-TR/T1)) exp(-TE/T2)` (TR, TE in ms)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


@dataclass(frozen=True)
class SpinEcho:
    """(Turbo) spin echo with repetition time `tr` and echo time `te` in ms.

    fat_saturation: share of the fat signal a spectral fat-saturation pulse removes (0 = none;
        fastMRI's CORPDFS_FBK knee scans are fat-saturated PD).
    """

    tr: float
    te: float
    fat_saturation: float = 0.0

    def signal(self, pd: float, t1: float, t2: float, fat: float = 0.0) -> float:
        """Signal of a tissue whose signal comes for the share `fat` from fat protons."""
        value = spin_echo(pd, t1, t2, self.tr, self.te)
        if self.fat_saturation:
            value = value * (1.0 - self.fat_saturation * fat)
        return value


@dataclass(frozen=True)
class InversionRecovery:
    """Inversion recovery (FLAIR when `ti` nulls the CSF): TR, TE and inversion time TI in ms."""

    tr: float
    te: float
    ti: float

    def signal(self, pd: float, t1: float, t2: float, fat: float = 0.0) -> float:
        """Magnitude signal `PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)`; `fat` is unused."""
        recovery = 1.0 - 2.0 * np.exp(-self.ti / t1) + np.exp(-self.tr / t1)
        return pd * abs(recovery) * np.exp(-self.te / t2)


Sequence = SpinEcho | InversionRecovery
