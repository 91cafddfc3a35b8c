"""A script's own process ends right after its last line (harness.outcome.end_the_process), except under a
profiler or coverage tool, which must still write its report at exit."""
import subprocess
import sys
import textwrap

from harness.cli import REPO

SCRIPT = textwrap.dedent(f"""
    import atexit, sys
    sys.path.insert(0, {str(REPO)!r})
    from harness.outcome import end_the_process
    atexit.register(lambda: open(sys.argv[1], "w").write("the interpreter's teardown ran"))
    print("last line", flush=False)
    end_the_process(3)
""")


def test_the_process_ends_without_the_interpreters_teardown_and_keeps_its_code(tmp_path):
    script, marker = tmp_path / "script.py", tmp_path / "teardown"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "last line\n"  # flushed before the exit
    assert not marker.exists()  # atexit hooks, finalizers and the final garbage collection were skipped


def test_a_profiler_still_writes_its_report(tmp_path):
    script, marker, report = tmp_path / "script.py", tmp_path / "teardown", tmp_path / "run.prof"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(report), str(script), str(marker)],
                   capture_output=True, text=True, timeout=60)
    assert report.exists() and marker.exists()  # a normal exit: the profiler's report and the atexit hooks


def test_systemexits_other_codes_keep_their_meaning(tmp_path):
    """None ends with 0; a message is printed and ends with 1, as a normal SystemExit would."""
    for code, expected, err in (("None", 0, ""), ("'stopped: no data'", 1, "stopped: no data\n")):
        script = tmp_path / "script.py"
        script.write_text(SCRIPT.replace("end_the_process(3)", f"end_the_process({code})"))
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "teardown")], capture_output=True,
                              text=True, timeout=60)
        assert (done.returncode, done.stderr) == (expected, err)
