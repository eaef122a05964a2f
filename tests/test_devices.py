"""Device profiles: shipped files load and cite sources, bad files fail naming file and key,
lookup by name / path / EDGEPEFT_DEVICES, `local` detection, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgepeft import devices

SHIPPED = (
    "raspberry-pi-5-8gb",
    "jetson-orin-nano-8gb",
    "android-arm64-8gb",
    "apple-m2-16gb",
    "x86-laptop-16gb",
    "rtx-4060-8gb",
)
_GOOD = """
name = "board"
description = "a test board"
memory = "4GiB"
memory_kind = "system"
reserved = "1GiB"
bandwidth_gbs = 10
bandwidth_kind = "peak"
cores = 4
providers = ["XNNPACK", "CPU"]
weight_formats = ["int4"]
"""


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_with_cited_figures(name):
    profile = devices.load_profile(name)
    assert profile.name == name and profile.source.endswith(f"{name}.toml")
    assert 0 <= profile.reserved < profile.memory and profile.bandwidth > 1e9
    assert profile.providers[-1] == "CPUExecutionProvider"
    assert all(p.endswith("ExecutionProvider") for p in profile.providers)
    text = (devices.DEVICES_DIR / f"{name}.toml").read_text()
    assert "Sources:" in text and "# Peak" in text  # where the figures come from, and peak vs sustained


def test_rtx_is_a_cuda_training_target_and_pi_a_cpu_board():
    rtx, pi = devices.load_profile("rtx-4060-8gb"), devices.load_profile("raspberry-pi-5-8gb")
    assert (rtx.accelerator, rtx.torch_device, rtx.memory_kind) == ("cuda", "cuda", "vram")
    assert rtx.bandwidth == pytest.approx(272e9) and rtx.memory == 8 * 2**30
    assert (pi.accelerator, pi.threads, pi.bandwidth) == ("cpu", 4, pytest.approx(17.1e9))


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('memory = true', "key 'memory' must be a size"),
        ('cores = "four"', "key 'cores' must be a positive integer"),
        ('memory_kind = "swap"', "key 'memory_kind' must be a string from"),
        ('weight_formats = ["int3"]', "key 'weight_formats'"),
        ('providers = ["Magic"]', "unknown execution provider 'Magic'"),
        ('colour = "red"', "unknown key(s) ['colour']"),
        ('reserved = "8GiB"', "reserved (8.00 GiB) must be less than memory"),
    ],
)
def test_bad_values_name_the_file_and_the_key(tmp_path, line, fragment):
    key = line.split(" =")[0]
    body = "\n".join(x for x in _GOOD.splitlines() if not x.startswith(f"{key} ="))
    path = tmp_path / "board.toml"
    path.write_text(f"{body}\n{line}\n")
    with pytest.raises(ValueError) as e:
        devices.load_profile(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_missing_key_and_unknown_name_say_what_to_do(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(_GOOD.replace('cores = 4\n', ""))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['cores'\]"):
        devices.load_profile(path)
    with pytest.raises(FileNotFoundError, match="known: .*raspberry-pi-5-8gb.*Add a file nope.toml"):
        devices.load_profile("nope")


def test_user_folder_from_env_var_is_searched_first(tmp_path, monkeypatch):
    (tmp_path / "board.toml").write_text(_GOOD)
    monkeypatch.setenv(devices.ENV_VAR, str(tmp_path))
    profile = devices.load_profile("board")
    assert "board" in devices.list_profiles()
    assert profile.providers == ("XnnpackExecutionProvider", "CPUExecutionProvider")
    assert profile.budget == 3 * 2**30 and profile.efficiency == devices.DEFAULT_EFFICIENCY["peak"]
    assert devices.available_providers(profile)[-1] == "CPUExecutionProvider"


def test_calibration_goes_to_a_user_folder_that_local_reads(tmp_path, monkeypatch):
    monkeypatch.delenv(devices.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    user = tmp_path / "config" / "edgepeft" / "devices"
    assert devices.profile_dirs() == [user, devices.DEVICES_DIR]
    assert devices.calibration_path() == user / "local.toml"
    user.mkdir(parents=True)
    (user / "local.toml").write_text("efficiency = 0.37\n")
    (user / "board.toml").write_text(_GOOD)
    assert devices.load_profile("board").source == str(user / "board.toml")
    assert devices.load_profile("local").efficiency == 0.37
    # $EDGEPEFT_DEVICES comes first, so a calibration written there is the one found.
    monkeypatch.setenv(devices.ENV_VAR, str(tmp_path / "mine"))
    assert devices.calibration_path() == tmp_path / "mine" / "local.toml"
    assert devices.profile_dirs() == [tmp_path / "mine", user, devices.DEVICES_DIR]


def test_shipped_profiles_live_inside_the_package():
    package = Path(devices.__file__).resolve().parent
    assert devices.DEVICES_DIR.resolve().is_relative_to(package)
    assert {p.stem for p in devices.DEVICES_DIR.glob("*.toml")} == set(SHIPPED)


def test_sizes_parse_like_the_training_planner():
    from edgepeft.train.memory import parse_memory

    for text in ("8GiB", "8G", "8GB", "512MiB", "1.5 GiB", 1234):
        assert devices.parse_size(text) == parse_memory(text)
    with pytest.raises(ValueError, match="cannot read"):
        devices.parse_size("8 bananas")


def test_local_profile_is_detected_and_takes_overrides(tmp_path):
    import onnxruntime

    local = devices.detect_local()
    assert local.name == "local" and local.bandwidth_kind == "measured"
    assert local.bandwidth > 1e8 and local.cores >= 1 and local.memory > local.reserved >= 0
    assert set(local.providers) <= set(onnxruntime.get_available_providers())
    overrides = tmp_path / "local.toml"
    overrides.write_text('efficiency = 0.42\ncalibrated = "test"\n')
    tuned = devices.local_profile(overrides)
    assert tuned.efficiency == 0.42 and tuned.bandwidth == local.bandwidth
    assert str(overrides) in tuned.source


def test_copy_test_measures_a_plausible_bandwidth():
    # Between 100 MB/s and 10 TB/s: a copy that was skipped or counted wrong falls outside.
    assert 1e8 < devices.measure_bandwidth(threads=1, nbytes=16 * 2**20, repeats=2) < 1e13


def test_module_imports_without_heavy_packages():
    code = (
        "import sys, edgepeft.devices as d; d.load_profile('rtx-4060-8gb'); "
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'numpy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
