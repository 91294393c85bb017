"""`medfl synth --shift`: the mild preset is today's data bit for bit; the realistic preset is deterministic,
readable by medfl's readers, and its sites differ in the documented ways."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfl.cli import main
from medfl.config import DataSettings, load_site_config
from medfl.data import inspect_site, load_site
from medfl.data.shift import DERMOSCOPY, site_shift
from medfl.errors import ConfigError
from medfl.synth import Minimums, generate
from medfl.synth import strength as strength_module
from medfl.synth.dermoscopy import _plan_rows
from medfl.synth.lesions import CLASSES, sample_lesion
from medfl.synth.phantom import Population, render_case, sample_anatomy, site_anatomy
from medfl.synth.realistic import (
    MINIMUMS,
    REALISTIC_DERM,
    REALISTIC_PROSTATE,
    T3_NOISE,
    T15_NOISE,
    realistic_derm_sites,
    realistic_prostate_sites,
)
from medfl.synth.rng import rng_for
from medfl.synth.sites import REFERENCE_DERM, REFERENCE_PROSTATE, derm_sites, prostate_sites
from medfl.synth.strength import DERM_LIMITS, derm_sites_at, prostate_sites_at, stopped_at_limits
from medfl.tasks import task_for

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SMALL = {"seed": 3, "scale": 0.01, "n_derm": 6, "n_prostate": 8, "minimums": Minimums(2, 1, 1, 3)}
# The mild preset on SMALL is guarded bit for bit in tests/test_synth.py, on that module's fixture (the same data).
# Realistic volumes are 1-3 M voxels: three cases per prostate site (train, val, test; prost_f ships a split file).
REALISTIC = {"seed": 3, "scale": 0.01, "n_derm": 5, "n_prostate": 6, "minimums": Minimums(2, 1, 1, 3),
             "shift": "realistic"}
# Determinism across processes on fewer volumes: one case of each of NIfTI int16, NIfTI float32 and MetaImage.
# Its dermoscopy files are REALISTIC's (the case count is prostate's only); its prostate files are stored apart.
DETERMINISM_SCRIPT = (
    "import sys; from medfl.synth import Minimums, generate; generate(sys.argv[1], seed=3, scale=0.01, n_derm=5, "
    "n_prostate=4, minimums=Minimums(2, 1, 1, 1), shift='realistic')"
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _differences(actual: dict[str, str], expected: dict[str, str]) -> list[str]:
    return sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("realistic"), **REALISTIC)


@pytest.fixture(scope="module")
def mild(tmp_path_factory: pytest.TempPathFactory):
    """The mild preset's dermoscopy sites with REALISTIC's arguments (the realistic class mix's minimums, given):
    what the realistic sites are compared with. Its first four sites are those of `n_derm=4`."""
    return generate(tmp_path_factory.mktemp("mild"), **{**REALISTIC, "shift": "mild", "n_prostate": 0})


def test_mild_command_writes_todays_default_data_bit_for_bit(tmp_path: Path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path), "--shift", "mild"]) == 0
    assert "(mild shift)" in capsys.readouterr().out
    expected = json.loads((DATA / "synth_mild_default_sha256.json").read_text())
    assert _differences(_hashes(tmp_path), expected) == []


def test_realistic_preset_keeps_its_files_bit_for_bit(realistic) -> None:
    """The realistic sites are the benchmarks' development federation: no change may alter their bytes unnoticed."""
    expected = json.loads((DATA / "synth_realistic_small_sha256.json").read_text())
    assert len(expected) == 364 and _differences(_hashes(realistic.out), expected) == []


def test_realistic_files_are_identical_in_another_process(mild, tmp_path: Path) -> None:
    """A fresh interpreter writes the bytes stored from another process: the dermoscopy files of the realistic
    guard and the one-case prostate sites of synth_realistic_determinism_sha256.json (tests/data/README.md)."""
    there = tmp_path / "there"
    subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(there)], check=True, cwd=REPO)
    realistic = json.loads((DATA / "synth_realistic_small_sha256.json").read_text())
    expected = {k: v for k, v in realistic.items() if k.startswith(("dermoscopy/", "site_configs/dermoscopy/"))}
    expected.update(json.loads((DATA / "synth_realistic_determinism_sha256.json").read_text()))
    written = _hashes(there)
    assert len(written) > 150 and _differences(written, expected) == []
    assert any(name.endswith(".raw") for name in written) and any(name.endswith(".nii.gz") for name in written)
    image = next(mild.derm[0].folder.rglob("*.jpg"))
    twin = there / image.relative_to(mild.out)
    assert twin.is_file() and twin.read_bytes() != image.read_bytes()  # same ids and layout, other pixels


def test_unknown_shift_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--shift must be one of mild, realistic"):
        generate(tmp_path, **{**SMALL, "shift": "extreme"})
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--shift", "extreme"])
    assert not any(tmp_path.iterdir())


def test_readers_and_check_accept_the_realistic_sites(realistic, capsys) -> None:
    settings = DataSettings(classes=list(CLASSES), input_size=16, num_workers=1)
    for path in realistic.configs:
        config = load_site_config(path)
        site = load_site(config, settings, task=task_for(config.task))
        assert not site.report.errors, site.report.errors
        assert all(site.splits[split] for split in ("train", "val"))
    capsys.readouterr()
    assert main(["check", "--classes", "nv,bkl,mel", "--input-size", "16", *map(str, realistic.configs)]) == 0
    assert f"{len(realistic.configs)} of {len(realistic.configs)} site(s) ready" in capsys.readouterr().out


def test_realistic_sites_keep_names_layouts_and_configs(realistic, mild) -> None:
    assert [(s.name, s.layout) for s in realistic.derm] == [(s.name, s.layout) for s in mild.derm]
    for site in mild.configs:
        twin = realistic.out / site.relative_to(mild.out)
        assert twin.read_text() == site.read_text()
    assert [s.name for s in realistic.prostate] == [f"prost_{c}" for c in "abcdef"]


def _chromaticity(folder: Path) -> np.ndarray:
    """Mean (r, g, b) / (r + g + b) of a site's images at 32 px: colour cast, not brightness (rings, vignettes)."""
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BOX), float) for p in folder.rglob("*.jpg")]
    mean = np.mean([p.reshape(-1, 3).mean(0) for p in pixels], axis=0)
    return mean / mean.sum()


def test_realistic_dermoscopy_sites_differ_in_colour_size_and_resolution(realistic, mild) -> None:
    spread = {}
    for name, result in (("mild", mild), ("realistic", realistic)):
        colours = np.array([_chromaticity(site.folder) for site in result.derm[:4]])
        spread[name] = np.abs(colours[:, None] - colours[None]).max()
    assert spread["realistic"] > 2 * spread["mild"]  # measured: 0.20 against 0.06
    red_blue = [c[0] / c[2] for c in (_chromaticity(site.folder) for site in realistic.derm[:4])]
    assert red_blue[2] > 2 * red_blue[1]  # Rosendahl-like red cast against MoleMax-like cool cast
    with Image.open(next(realistic.derm[1].folder.rglob("*.jpg"))) as image:
        assert image.size == (48, 48)  # the low-resolution site
    gains = np.array([site.acquisition.cast for site in REALISTIC_DERM])
    assert gains.min() >= 0.75 and gains.max() <= 1.25 and gains.max() - gains.min() >= 0.4
    contrast = [site.acquisition.contrast for site in REALISTIC_DERM]
    magnification = [site.acquisition.magnification for site in REALISTIC_DERM]
    assert 0.6 <= min(contrast) < max(contrast) <= 1.3 and 0.6 <= min(magnification) < max(magnification) <= 1.7
    low = min(REALISTIC_DERM, key=lambda s: s.acquisition.resolution).acquisition
    assert low.jpeg_quality <= 70 and low.blur > 0.02 and low.noise >= 0.04
    assert sum(s.acquisition.ring for s in REALISTIC_DERM) >= 2
    extra = realistic.derm[4]
    assert extra.name == "derm_e"


def test_skin_tone_range_is_a_site_term() -> None:
    def skin(tone: tuple[float, float]) -> float:
        return float(np.mean([sample_lesion("nv", rng_for(0, "skin", i), tone).skin[2] for i in range(200)]))

    light, dark = skin((0.0, 0.35)), skin((0.25, 0.75))
    assert light > dark + 0.05  # darker skin has less blue reflectance
    tones = {site.name: site.skin_tone for site in REALISTIC_DERM}
    assert len(set(tones.values())) == 4


def test_realistic_class_mix_is_the_reference_mix() -> None:
    for index, site in enumerate(REALISTIC_DERM):
        rows = _plan_rows(site, index, 0, 0.6, MINIMUMS)
        kept = [r for r in rows if r.label and r.dataset == site.dataset]
        counts = Counter(r.label for r in kept)
        for cls, train in zip(CLASSES, site.train_counts, strict=True):
            lesions = len({r.lesion_id for r in kept if r.label == cls})
            total = round(train / 0.7 * 0.6)
            # Either exactly the reference share, or (a rare class) exactly the lesions a 70/10/20 split needs.
            assert counts[cls] == total or (lesions == MINIMUMS.lesions() and counts[cls] > total), (site.name, cls)
    assert MINIMUMS.lesions() == 12
    assert REALISTIC_DERM[1].train_counts == REFERENCE_DERM[1].train_counts == (2604, 87, 17)


def test_realistic_prostate_protocols_span_the_documented_ranges(realistic) -> None:
    scanners = [site.scanner for site in REALISTIC_PROSTATE]
    fov = [s.matrix * s.spacing for s in scanners]
    assert 1.5 <= max(fov) / min(fov) <= 2.5
    assert all(0.4 <= s.spacing <= 0.8 and s.matrix <= 320 for s in scanners)
    assert min(s.thickness for s in scanners) == 1.25 and max(s.thickness for s in scanners) == 4.0
    assert 2 <= T15_NOISE / T3_NOISE <= 3
    assert {s.noise >= 0.04 for s in scanners} == {True, False}
    assert sum(s.endorectal > 0 for s in scanners) >= 2
    for site in realistic.prostate:  # the files carry the protocol
        assert max(site.shape[:2]) <= 320 and 0.4 <= site.spacing[0] <= 0.8
    extra = realistic_prostate_sites(26, 0)[6:]  # randomly drawn sites stay inside the ranges too
    assert all(0.4 <= s.scanner.spacing <= 0.8 and s.scanner.matrix <= 320 for s in extra)
    assert all(1.25 <= s.scanner.thickness <= 4 and 120 <= s.scanner.matrix * s.scanner.spacing <= 240 for s in extra)


def test_endorectal_coil_brightens_the_gland_behind_and_deforms_it() -> None:
    """Same patient, same scanner, same noise: the coil's gain and the balloon's imprint, nothing else."""
    scanner = replace(REALISTIC_PROSTATE[4].scanner, matrix=96, spacing=1.4, slices=12, thickness=5.0, noise=0.0)
    anatomy = sample_anatomy(rng_for(0, "patient"))
    with_coil, mask, affine = render_case(anatomy, scanner, rng_for(0, "scan"))
    without, _, _ = render_case(anatomy, replace(scanner, endorectal=0.0), rng_for(0, "scan"))
    gain = with_coil.astype(float) / np.maximum(without.astype(float), 1.0)
    inside = mask > 0
    y = np.einsum("ij,...j->...i", affine[:3, :3], np.indices(mask.shape).transpose(1, 2, 3, 0))[..., 1][inside]
    posterior, anterior = gain[inside][y < np.quantile(y, 0.2)], gain[inside][y > np.quantile(y, 0.8)]
    assert posterior.mean() > 1.6 and anterior.mean() < 1.4 and posterior.mean() > 1.3 * anterior.mean()
    pressed = site_anatomy(anatomy, Population(), True, rng_for(0, "balloon"))
    assert 15 <= pressed.rectum_radius <= 19 and pressed.gland_centre[1] > anatomy.gland_centre[1]
    assert pressed.gland_axes[1] < 0.9 * anatomy.gland_axes[1] and pressed.gland_axes[0] > anatomy.gland_axes[0]
    assert site_anatomy(anatomy, Population(), False, rng_for(0, "balloon")) is anatomy
    larger = site_anatomy(anatomy, Population(gland_scale=1.25, central_extra=0.1), False, rng_for(0, "size"))
    np.testing.assert_allclose(larger.gland_axes, 1.25 * anatomy.gland_axes)
    assert larger.central_scale > anatomy.central_scale


# ---------------------------------------------------------------- --site-seed: other hospitals to confirm on
PROTOCOL = ("matrix", "slices", "spacing", "thickness", "contrast", "bias", "noise", "fat", "peripheral", "central",
            "endorectal", "surface", "float_levels")  # what a site seed draws; the rest is storage convention


def test_site_seed_zero_writes_todays_realistic_files_bit_for_bit(tmp_path: Path, capsys) -> None:
    """The default (0) is what test_realistic_preset_keeps_its_files_bit_for_bit guards; the option said out loud on
    the command line writes the same bytes (the guard's dermoscopy sites: the command's minimums leave prostate's
    number of cases at its default)."""
    expected = json.loads((DATA / "synth_realistic_small_sha256.json").read_text())
    assert main(["synth", "--out", str(tmp_path), "--seed", "3", "--scale", "0.01", "--derm-sites", "5",
                 "--prostate-sites", "0", "--min-per-class", "2,1,1", "--shift", "realistic", "--site-seed", "0"]) == 0
    assert "(realistic shift)" in capsys.readouterr().out
    derm = {k: v for k, v in expected.items() if not k.startswith(("prostate/", "site_configs/prostate/"))}
    assert len(derm) > 100 and _differences(_hashes(tmp_path), derm) == []


def test_a_site_seed_draws_other_hospitals_with_the_same_layouts_and_class_mixes() -> None:
    today, other = realistic_derm_sites(6, 3), realistic_derm_sites(6, 3, site_seed=1)
    for before, after in zip(today, other, strict=True):
        assert replace(after, acquisition=before.acquisition, skin_tone=before.skin_tone) == before, after.name
        assert after.acquisition != before.acquisition and after.skin_tone != before.skin_tone, after.name
        drawn = after.acquisition
        assert drawn.resolution in (48, 64, 80, 96, 112, 128) and 0.6 <= drawn.magnification <= 1.7
        assert all(0.75 <= g <= 1.25 for g in drawn.cast) and 0.6 <= drawn.contrast <= 1.3
        assert 0.0 <= after.skin_tone[0] < after.skin_tone[1] <= 1.0
    assert [s.acquisition for s in realistic_derm_sites(6, 5, site_seed=1)] == [s.acquisition for s in other], \
        "the site seed alone draws the hospitals; --seed draws patients and splits"
    assert [s.acquisition for s in realistic_derm_sites(6, 3, site_seed=2)] != [s.acquisition for s in other]

    today_p, other_p = realistic_prostate_sites(7, 3), realistic_prostate_sites(7, 3, site_seed=1)
    for before, after in zip(today_p, other_p, strict=True):
        assert replace(after, scanner=before.scanner, population=before.population) == before, after.name
        assert replace(after.scanner, **{k: getattr(before.scanner, k) for k in PROTOCOL}) == before.scanner
        assert after.scanner != before.scanner, after.name
        scanner = after.scanner
        assert 0.4 <= scanner.spacing <= 0.8 and scanner.matrix <= 320 and 1.25 <= scanner.thickness <= 4
        assert 120 <= scanner.matrix * scanner.spacing <= 240
    protocols = [[getattr(s.scanner, k) for k in PROTOCOL] for s in realistic_prostate_sites(7, 5, site_seed=1)]
    assert protocols == [[getattr(s.scanner, k) for k in PROTOCOL] for s in other_p]  # extra sites: storage by --seed


def test_site_seed_files_keep_the_tables_and_change_the_images(realistic, tmp_path: Path, capsys) -> None:
    small = {**REALISTIC, "n_derm": 2, "n_prostate": 1}
    other = generate(tmp_path / "other", **small, site_seed=1)
    # Today's files of those sites: the realistic fixture's first two dermoscopy sites and first prostate site.
    names = {site.name for site in (*other.derm, *other.prostate)}
    before = {k: v for k, v in _hashes(realistic.out).items()
              if k.split("/")[1] in names or (k.startswith("site_configs/") and Path(k).stem in names)}
    after = _hashes(other.out)
    assert before.keys() == after.keys(), "the same sites, layouts, ids and cases"
    tables = [k for k in before if k.endswith((".csv", ".yaml"))]
    images = [k for k in before if k.endswith((".jpg", ".nii.gz", ".mhd", ".raw"))]
    assert tables and all(before[k] == after[k] for k in tables), "labels, lesions and splits: the same class mixes"
    assert images and all(before[k] != after[k] for k in images if not k.endswith(".mhd"))
    assert main(["check", "--classes", "nv,bkl,mel", "--input-size", "16", *map(str, other.configs)]) == 0
    with pytest.raises(ConfigError, match="--site-seed 1 draws the sites of the realistic preset"):
        generate(tmp_path / "mild", **{**small, "shift": "mild"}, site_seed=1)


# ---------------------------------------------------------------- --shift-strength: from the mild sites to beyond
# The guard's dermoscopy sites (seed 3, scale 0.01, 5 sites) at the strengths the sweep measures, and at 0 and 1.
STRENGTHS = (0.0, 0.5, 1.0, 1.5)
STRENGTH_DATA = {"seed": 3, "scale": 0.01, "n_derm": 5, "n_prostate": 0, "minimums": Minimums(2, 1, 1, 3),
                 "shift": "realistic"}


@pytest.fixture(scope="module")
def strengths(tmp_path_factory: pytest.TempPathFactory) -> dict[float, tuple[Path, str]]:
    """strength -> (output folder, what the command printed). Strength 1 is written through `medfl synth
    --shift-strength 1`, the others by `generate`."""
    root = tmp_path_factory.mktemp("strengths")
    written = {}
    for s in STRENGTHS:
        out = root / f"s{s:g}"
        if s == 1.0:
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                assert main(["synth", "--out", str(out), "--seed", "3", "--scale", "0.01", "--derm-sites", "5",
                             "--prostate-sites", "0", "--min-per-class", "2,1,1", "--shift", "realistic",
                             "--shift-strength", "1"]) == 0
            written[s] = out, printed.getvalue()
        else:
            written[s] = generate(out, **STRENGTH_DATA, shift_strength=s).out, ""
    return written


def test_strength_one_writes_todays_realistic_files_bit_for_bit(strengths) -> None:
    expected = json.loads((DATA / "synth_realistic_small_sha256.json").read_text())
    derm = {k: v for k, v in expected.items() if not k.startswith(("prostate/", "site_configs/prostate/"))}
    out, printed = strengths[1.0]
    assert "(realistic shift, strength 1)" in printed
    assert len(derm) > 100 and _differences(_hashes(out), derm) == []


def test_strength_zero_writes_the_mild_images_with_the_realistic_class_mix(strengths, mild) -> None:
    assert {**REALISTIC, "n_prostate": 0} == STRENGTH_DATA  # the mild fixture's arguments: the same minimums, given
    assert _hashes(strengths[0.0][0]) == _hashes(mild.out)


def test_strength_zero_and_one_are_the_mild_and_realistic_sites_with_any_site_seed() -> None:
    for site_seed in (0, 1):
        mild, realistic = derm_sites(30, 3), realistic_derm_sites(30, 3, site_seed)
        at_zero, at_one = derm_sites_at(30, 3, site_seed, 0.0), derm_sites_at(30, 3, site_seed, 1.0)
        assert [s.acquisition for s in at_zero] == [s.acquisition for s in mild]
        assert [s.skin_tone for s in at_zero] == [s.skin_tone for s in mild]
        assert at_zero == [replace(s, acquisition=m.acquisition, skin_tone=m.skin_tone) for s, m in
                           zip(realistic, mild, strict=True)], "the class mix is the realistic preset's"
        assert at_one == realistic
        assert prostate_sites_at(30, 3, site_seed, 0.0) == prostate_sites(30, 3)
        assert prostate_sites_at(30, 3, site_seed, 1.0) == realistic_prostate_sites(30, 3, site_seed)
    assert stopped_at_limits(1.0, 30, 30) == stopped_at_limits(1.0, 30, 30, site_seed=1) == []


def test_continuous_parameters_interpolate_and_discrete_ones_switch_at_one_half() -> None:
    b0, b1 = REFERENCE_DERM[1], REALISTIC_DERM[1]
    quarter, half, beyond = (derm_sites_at(4, 0, strength=s) for s in (0.25, 0.5, 1.5))
    assert quarter[1].acquisition.resolution == 64 and half[1].acquisition.resolution == 48  # the low-res site
    assert not quarter[2].acquisition.ring and half[2].acquisition.ring  # derm_c's contact dermatoscope
    assert half[1].acquisition.contrast == pytest.approx((1.0 + 0.65) / 2)
    assert half[2].acquisition.magnification == pytest.approx((1.0 + 0.65) / 2)
    assert half[1].acquisition.blur == pytest.approx((b0.acquisition.blur + b1.acquisition.blur) / 2)
    assert half[3].skin_tone == pytest.approx((0.0, 1.0))  # derm_d's mixed population: the whole range at every s
    assert half[2].skin_tone == pytest.approx((0.125, 0.875))
    assert beyond[1].acquisition.magnification == pytest.approx(1.9)  # x1.6 goes on to x1.9
    assert beyond[2].acquisition.magnification == 0.5  # x0.65 stops at its limit
    assert beyond[1].acquisition.contrast == 0.5 and beyond[1].skin_tone == (0.0, 0.1)
    for sites in (quarter, half, beyond):
        assert [(s.name, s.layout, s.train_counts, s.dropped, s.foreign) for s in sites] == \
               [(s.name, s.layout, s.train_counts, s.dropped, s.foreign) for s in REALISTIC_DERM]
    prostate = {s: prostate_sites_at(6, 0, strength=s) for s in (0.25, 0.5, 1.5, 2.0)}
    bmc = [prostate[s][1].scanner for s in (0.25, 0.5, 1.5)]
    assert bmc[0].endorectal == 0 and bmc[0].matrix == REFERENCE_PROSTATE[1].scanner.matrix  # no coil, mild grid
    assert bmc[1].endorectal == pytest.approx(1.25) and bmc[1].matrix == 300  # the coil from 0.5, half its gain
    assert bmc[2].endorectal == pytest.approx(3.75)
    assert prostate[1.5][4].scanner.endorectal == 4.0 and prostate[1.5][4].scanner.noise == 0.005
    for name, (low, high) in DERM_LIMITS.items():
        for site in derm_sites_at(30, 0, strength=2.0):
            value = getattr(site.acquisition, name)
            assert all(low <= v <= high for v in (value if isinstance(value, tuple) else (value,))), (site.name, name)


def test_the_parameters_that_stop_at_their_limit_at_one_and_a_half_are_documented() -> None:
    stopped = stopped_at_limits(1.5)
    assert stopped == ["derm_b: skin_tone", "derm_b: cast", "derm_b: contrast", "derm_b: offset", "derm_c: cast",
                       "derm_c: magnification", "derm_d: cast_jitter", "prost_d: gland_spread",
                       "prost_d: central_extra", "prost_e: noise", "prost_e: endorectal"]
    documented = " ".join(strength_module.__doc__.split())
    for entry in stopped:
        site, parameter = entry.split(": ")
        assert site in documented
    assert len(stopped_at_limits(2.0)) > len(stopped)


@pytest.mark.parametrize("value, shift, fragment", [
    ("-0.5", "realistic", "--shift-strength must be a number from 0"),
    ("nan", "realistic", "--shift-strength must be a number from 0"),
    ("2.5", "realistic", "--shift-strength must be a number from 0"),
    ("0.5", "mild", "--shift-strength 0.5 scales the realistic preset's site shift"),
])
def test_bad_strengths_are_one_line_errors(value: str, shift: str, fragment: str, tmp_path: Path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path / "out"), "--shift", shift, "--shift-strength", value]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and fragment in captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jpg"))


def _mean_site_shift(out: Path) -> tuple[float, np.ndarray]:
    """What `medfl check` measures on the generated dermoscopy sites: the mean site shift and the mean over sites
    of each statistic's distance."""
    settings = DataSettings(classes=list(CLASSES), num_workers=1)
    measured = {}
    for path in sorted((out / "site_configs" / "dermoscopy").glob("*.yaml")):
        config = load_site_config(path)
        measured[config.name] = inspect_site(config, settings, task=task_for(config.task)).report.statistics.compared
    shift = site_shift(measured)
    return shift.mean_shift, shift.distances.mean(axis=0)


def test_the_shift_meter_ranks_the_strengths_in_order(strengths) -> None:
    """Measured (seed 3, scale 0.01, 5 sites, 47-67 images each) at s = 0, 0.5, 1, 1.5: mean site shift 1.13,
    1.82, 2.15, 2.35; mean distance over sites of detail % 0.19, 0.19, 0.27, 0.51 and of lesion % 0.14, 0.44, 0.77,
    0.99."""
    measured = [_mean_site_shift(strengths[s][0]) for s in STRENGTHS]
    means = [mean for mean, _ in measured]
    assert means == sorted(means) and len(set(means)) == len(means), means
    detail, lesion = (DERMOSCOPY.compared.index(name) for name in ("detail %", "lesion %"))
    for column in (detail, lesion):  # what the colour statistics are blind to sees the sweep too
        values = [distances[column] for _, distances in measured]
        assert values == sorted(values), (DERMOSCOPY.compared[column], values)
