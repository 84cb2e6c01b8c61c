"""The trainer's huge-page malloc restart: which environment it asks for, and when it leaves the process alone."""

import os
import subprocess
import sys

import pytest

from sdxl_jax.train import huge_pages


@pytest.fixture
def linux_with_thp(monkeypatch):
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")


def test_the_tunable_is_added_to_the_environment(linux_with_thp):
    env = huge_pages.huge_pages_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_other_tunables_are_kept(linux_with_thp):
    env = huge_pages.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=0", "x=1:glibc.malloc.hugetlb=2"])
def test_a_tunable_already_set_is_left_alone_and_stops_a_second_restart(linux_with_thp, tunables):
    assert huge_pages.huge_pages_environment({"GLIBC_TUNABLES": tunables}) is None


@pytest.mark.parametrize("mode", ["never", None])
def test_nothing_to_do_without_transparent_huge_pages(linux_with_thp, monkeypatch, mode):
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: mode)
    assert huge_pages.huge_pages_environment({}) is None


def test_nothing_to_do_off_glibc(linux_with_thp, monkeypatch):
    monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: ("", ""))
    assert huge_pages.huge_pages_environment({}) is None
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    assert huge_pages.huge_pages_environment({}) is None


def test_the_kernel_mode_is_read_from_its_bracket(tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", tmp_path / "enabled")
    assert huge_pages.thp_mode() == "madvise"
    monkeypatch.setattr(huge_pages, "THP_MODE", tmp_path / "missing")
    assert huge_pages.thp_mode() is None


def test_the_process_restarts_once_with_the_same_arguments():
    """A real restart: the child script records its environment and arguments, twice at most."""
    code = (
        "import os, sys; from sdxl_jax.train import huge_pages; "
        "print('run', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
        "huge_pages.reexec_with_huge_pages()"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True, check=True
    ).stdout
    runs = [line for line in out.splitlines() if line.startswith("run")]
    if huge_pages.huge_pages_environment(env) is None:  # this host cannot use it: nothing happens
        assert runs == ["run None ['a', '--b=1']"]
    else:
        assert runs == ["run None ['a', '--b=1']", "run glibc.malloc.hugetlb=1 ['a', '--b=1']"]
        assert "restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in out
