"""Synthetic heads: tissue fractions per voxel (`data.brain_anatomy`), and their MR signal.

Each tissue class gets a fraction map (partial volume at tissue borders), so a subject is computed
once and can be imaged with any sequence at either field strength:
`signal = sum_t fraction_t * S_t * texture_t` with `S_t` the sequence's
signal model (`data.sequences`) for the tissue's PD, T1 and T2 at that field.

Image convention: arrays are `(S, N, N)` = (slices, rows, columns); row 0 is anterior, slice 0 the
most inferior. In-plane coordinates are in units of half the field of view (FOV spans [-1, 1)),
with the centre at pixel N // 2 (the centre of a centred FFT).
"""

from dataclasses import dataclass

import numpy as np

from data.brain_anatomy import HEAD_HEIGHT_RATIO, TISSUE_NAMES, sample_anatomy, smooth_field
from data.sequences import Sequence

__all__ = ["HEAD_HEIGHT_RATIO", "HeadPhantom", "TISSUES", "Tissue", "sample_head", "smooth_field", "tissues"]


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters of one tissue class at one field strength (times in ms), its proton
    density relative to water, and its texture amplitudes."""

    pd: float
    t1: float
    t2: float
    coarse_texture: float  # relative amplitude of smooth in-tissue variation
    fine_texture: float  # relative amplitude of near-pixel-scale variation


def _fast_exchange(a: Tissue, b: Tissue, share_a: float) -> Tissue:
    """A tissue mixing two at the molecular scale: relaxation rates and PD average linearly."""
    mix = lambda u, v: share_a * u + (1.0 - share_a) * v  # noqa: E731
    return Tissue(pd=mix(a.pd, b.pd), t1=1.0 / mix(1.0 / a.t1, 1.0 / b.t1),
                  t2=1.0 / mix(1.0 / a.t2, 1.0 / b.t2), coarse_texture=mix(a.coarse_texture, b.coarse_texture),
                  fine_texture=mix(a.fine_texture, b.fine_texture))


def _table(gm: Tissue, wm: Tissue, csf: Tissue, fat: Tissue, marrow: Tissue, muscle: Tissue) -> dict[str, Tissue]:
    return {
        "air": Tissue(pd=0.0, t1=1000.0, t2=1.0, coarse_texture=0.0, fine_texture=0.0),
        "scalp": muscle,
        "fat": fat,
        # Cortical bone: T2* ~0.4-0.5 ms (Reichert et al. 2005, Magn Reson Imaging 23:611), no
        # signal at the echo times of these sequences.
        "bone": Tissue(pd=0.2, t1=250.0, t2=0.5, coarse_texture=0.20, fine_texture=0.10),
        "marrow": marrow,
        "csf": csf,
        "gm": gm,
        "wm": wm,
        # Caudate and putamen: grey matter with myelinated fibre bundles; their relaxation lies
        # between cortical grey and white matter, modelled as a 60/40 fast-exchange mixture.
        "deep_gm": _fast_exchange(gm, wm, 0.6),
        # Lesion classes are not measurements: chosen for the glioma appearance (oedema and
        # necrosis T2-bright and T1-dark, solid tumour in between).
        "oedema": Tissue(pd=0.90, t1=1400.0, t2=220.0, coarse_texture=0.08, fine_texture=0.05),
        "tumour": Tissue(pd=0.85, t1=1050.0, t2=140.0, coarse_texture=0.12, fine_texture=0.08),
        "necrosis": Tissue(pd=0.95, t1=2500.0, t2=700.0, coarse_texture=0.05, fine_texture=0.04),
    }


# Proton density: brain water content, white matter ~0.69-0.70, grey matter ~0.80 (Neeb et al.
# 2006, NeuroImage 31:1156), CSF ~1; fat and fatty marrow ~0.9, muscle ~0.75 (approximate).
_PD = {"gm": 0.80, "wm": 0.70, "csf": 1.0, "fat": 0.90, "marrow": 0.85, "muscle": 0.75}

TISSUES: dict[float, dict[str, Tissue]] = {
    1.5: _table(
        # T1 in vivo at 1.5 T: GM 1197, WM 646 ms (Lu et al. 2005, J Magn Reson Imaging 22:13).
        # T2 at 1.5 T: GM 95, WM 72 ms (Stanisz et al. 2005, Magn Reson Med 54:507). Stanisz's
        # 1.5 T T1 (GM 1124, WM 884, tissue samples) would leave almost no GM/WM contrast on T1w.
        gm=Tissue(pd=_PD["gm"], t1=1197.0, t2=95.0, coarse_texture=0.05, fine_texture=0.05),
        wm=Tissue(pd=_PD["wm"], t1=646.0, t2=72.0, coarse_texture=0.04, fine_texture=0.03),
        # CSF: T1 ~4.3 s at 1.5 and 3 T (Rooney et al. 2007, Magn Reson Med 57:308); T2 ~2 s.
        csf=Tissue(pd=_PD["csf"], t1=4300.0, t2=2000.0, coarse_texture=0.02, fine_texture=0.02),
        # Subcutaneous fat T1 343, T2 58; muscle T1 1008, T2 44 (Gold et al. 2004, AJR 183:343).
        fat=Tissue(pd=_PD["fat"], t1=343.0, t2=58.0, coarse_texture=0.10, fine_texture=0.08),
        # Fatty (yellow) marrow: T1 288 ms (Gold et al. 2004); T2 taken as fat's.
        marrow=Tissue(pd=_PD["marrow"], t1=288.0, t2=58.0, coarse_texture=0.15, fine_texture=0.10),
        muscle=Tissue(pd=_PD["muscle"], t1=1008.0, t2=44.0, coarse_texture=0.10, fine_texture=0.08),
    ),
    3.0: _table(
        # Wansapura et al. 1999, J Magn Reson Imaging 9:531 (in vivo, 3 T): GM T1 1331, T2 110;
        # WM T1 832, T2 79.6 ms.
        gm=Tissue(pd=_PD["gm"], t1=1331.0, t2=110.0, coarse_texture=0.05, fine_texture=0.05),
        wm=Tissue(pd=_PD["wm"], t1=832.0, t2=79.6, coarse_texture=0.04, fine_texture=0.03),
        csf=Tissue(pd=_PD["csf"], t1=4300.0, t2=2000.0, coarse_texture=0.02, fine_texture=0.02),
        # Gold et al. 2004 at 3 T: fat T1 382, T2 68; muscle T1 1412, T2 50; marrow T1 365 ms.
        fat=Tissue(pd=_PD["fat"], t1=382.0, t2=68.0, coarse_texture=0.10, fine_texture=0.08),
        marrow=Tissue(pd=_PD["marrow"], t1=365.0, t2=68.0, coarse_texture=0.15, fine_texture=0.10),
        muscle=Tissue(pd=_PD["muscle"], t1=1412.0, t2=50.0, coarse_texture=0.10, fine_texture=0.08),
    ),
}
assert all(set(table) == set(TISSUE_NAMES) for table in TISSUES.values())


def tissues(field_strength_t: float) -> dict[str, Tissue]:
    """The tissue table at a field strength (1.5 or 3 T)."""
    if field_strength_t not in TISSUES:
        raise ValueError(f"no tissue parameters at {field_strength_t} T (known: {sorted(TISSUES)})")
    return TISSUES[field_strength_t]


@dataclass
class HeadPhantom:
    """One subject sampled on `(S, N, N)` slices.

    fractions: tissue name -> `(S, N, N)` float32 fraction in [0, 1]; they sum to 1 per voxel.
    coarse, fine: `(S, N, N)` float32 zero-mean unit-scale texture fields shared by all tissues.
    brain: `(S, N, N)` bool, the brain mask a skull-stripping tool would output.
    """

    fractions: dict[str, np.ndarray]
    coarse: np.ndarray
    fine: np.ndarray
    brain: np.ndarray

    def image(self, sequence: Sequence, field_strength_t: float) -> np.ndarray:
        """Noise-free magnitude image `(S, N, N)` float32 acquired with `sequence` on a scanner of
        `field_strength_t` tesla."""
        table = tissues(field_strength_t)
        out = np.zeros_like(self.coarse)
        for name, frac in self.fractions.items():
            tissue = table[name]
            s = np.float32(sequence.signal(tissue.pd, tissue.t1, tissue.t2))
            if s == 0:
                continue
            texture = 1.0 + tissue.coarse_texture * self.coarse + tissue.fine_texture * self.fine
            out += frac * (s * texture)
        return np.maximum(out, 0.0)


def sample_head(
    rng: np.random.Generator,
    n: int,
    heights: np.ndarray,
    head_semi_axis: float,
    lesions: bool,
    skull: bool = True,
) -> HeadPhantom:
    """Draw one random subject (`data.brain_anatomy.sample_anatomy`) and sample it on axial slices.

    Args:
        rng: source of all randomness for this subject.
        n: in-plane matrix size N.
        heights: `(S,)` slice heights in unit head space (-1 = bottom of the head, 1 = vertex).
        head_semi_axis: antero-posterior head semi-axis in units of half the FOV (head size in image).
        lesions: add a glioma-like lesion (BraTS-like subjects).
        skull: False: skull-stripped, air outside the brain mask.

    Returns:
        The phantom, arrays `(S, n, n)`.
    """
    anatomy = sample_anatomy(rng, n, heights, head_semi_axis, lesions, skull=skull)
    return HeadPhantom(fractions=anatomy.fractions, coarse=anatomy.coarse, fine=anatomy.fine,
                       brain=anatomy.brain)
