"""The runner and the result readers, on tiny scripts run for real and on the scripts' JSON shapes."""

import json
import textwrap

import pytest

from miles_envs.benchrun import (
    BENCHES,
    Bench,
    Measure,
    at_most,
    embedded_throughput_measures,
    field_at,
    loop_overhead_measures,
    mtp_measures,
    read_results,
    run_bench,
    sandbox_measures,
    script_folder,
    select,
    spec_decode_measures,
    supported_args,
)

TINY = textwrap.dedent(
    """
    import argparse, json, sys
    from pathlib import Path
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--mode", default="ok")
    args = parser.parse_args()
    print(f"size {args.size} concurrency {args.concurrency}")
    if args.mode == "fail":
        sys.exit("broken on purpose")
    if args.mode == "ok":
        out = Path(__file__).resolve().parent / "results" / "tiny.json"
        out.write_text(json.dumps({"latency_ms": args.size / 100, "concurrency": args.concurrency}))
    """
)


def tiny_bench(quick_args=("--size", "300", "--concurrency", "2", "4", "--unknown", "1")):
    return Bench("tiny", "tiny.py", lambda data: [Measure("tiny latency", data["latency_ms"], "ms", at_most(5))],
                 tuple(quick_args))


@pytest.fixture
def bench_dir(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "tiny.py").write_text(TINY)
    (folder / "results").mkdir()
    return folder


def test_quick_args_keep_only_the_options_the_script_offers(bench_dir):
    args = supported_args(bench_dir / "tiny.py", ("--size", "300", "--concurrency", "2", "4", "--unknown", "1", "--mode"))
    assert args == ["--size", "300", "--concurrency", "2", "4", "--mode"]


def test_a_script_with_its_own_quick_flag_gets_only_that(tmp_path):
    script = tmp_path / "q.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--quick', action='store_true')\n"
                      "p.add_argument('--size')\np.parse_args()\n")
    assert supported_args(script, ("--size", "3")) == ["--quick"]


def test_staged_run_writes_results_elsewhere_and_reads_them(bench_dir, tmp_path):
    results = tmp_path / "out"
    with script_folder(results, bench_dir) as folder:
        assert folder != bench_dir
        outcome = run_bench(tiny_bench(), folder, results, quick=True, timeout=60, log_dir=results / "logs")
    assert outcome.status == "ran", outcome.detail
    assert outcome.detail == "--size 300 --concurrency 2 4"
    (measure,) = outcome.measures
    assert (measure.value, measure.met) == (3.0, True)
    assert json.loads((results / "tiny.json").read_text())["concurrency"] == [2, 4]
    assert not (bench_dir / "results" / "tiny.json").exists()  # the published folder is untouched
    assert "size 300 concurrency [2, 4]" in (results / "logs" / "tiny.log").read_text()


def test_full_run_in_place_uses_default_sizes(bench_dir):
    results = bench_dir / "results"
    with script_folder(results, bench_dir) as folder:
        assert folder == bench_dir
        outcome = run_bench(tiny_bench(), folder, results, quick=False, timeout=60, log_dir=results / "logs")
    assert outcome.status == "ran"
    assert (outcome.measures[0].value, outcome.measures[0].met) == (10.0, False)


@pytest.mark.parametrize("mode, status, detail", [
    ("fail", "failed", "exit 1: broken on purpose"),
    ("silent", "no results", "the script wrote no"),
])
def test_failures_are_reported_not_raised(bench_dir, tmp_path, mode, status, detail):
    results = tmp_path / "out"
    with script_folder(results, bench_dir) as folder:
        outcome = run_bench(tiny_bench(("--mode", mode)), folder, results, quick=True, timeout=60,
                            log_dir=results / "logs")
    assert outcome.status == status
    assert detail in outcome.detail and outcome.measures == []


def test_missing_script_is_reported(bench_dir, tmp_path):
    bench = Bench("absent", "absent.py", lambda data: [])
    outcome = run_bench(bench, bench_dir, tmp_path, quick=False, timeout=60, log_dir=tmp_path)
    assert (outcome.status, outcome.detail) == ("missing", "no script bench/absent.py")


def test_results_of_another_shape_name_the_missing_field(tmp_path):
    path = tmp_path / "loop_overhead.json"
    path.write_text(json.dumps({"per_turn": {}, "concurrent": {}}))
    outcome = read_results(select(["loop_overhead"])[0], path, "stored")
    assert outcome.status == "failed"
    assert "results have no field 'episodes'" in outcome.detail


def test_select_suggests_close_names():
    assert [b.name for b in select([])] == [b.name for b in BENCHES]
    with pytest.raises(ValueError, match="no bench named 'serch' \\(did you mean search\\?\\)"):
        select(["serch"])


def test_field_at_walks_dotted_paths():
    assert field_at({"a": {"b": 2}}, "a.b") == 2


# -- readers on the JSON each script writes -----------------------------------------------------

def test_loop_overhead_targets():
    measures = loop_overhead_measures({
        "in_process_turn": {"ToolCalc": {"turn_overhead_us": 42.0, "rendering_us": 20.0, "delta_cache_hit_rate": 0.25}},
        "through_http": {"ToolCalc": {"full_turn_without_env_us": 320.0, "client_us": 209.0, "server_us": 120.0, "env_us": 9.0}},
        "concurrent": {"episodes": 10000, "loop_lag_p99_ms": 61.0, "wall_s": 1.2, "ideal_wall_s": 0.15,
                       "completed": 10000},
    })
    assert [(m.value, m.met) for m in measures] == [(42.0, True), (320.0, False), (61.0, False), (1.2, True)]
    assert measures[2].name == "10,000 concurrent episodes, 50 ms latency: event-loop lag p99"
    assert measures[2].note == "" and measures[0].note == "rendering 20 µs; delta cache hits 25%"


def test_sandbox_targets_and_skipped_docker():
    data = {"cpus": 2, "target_execs_per_s": 100.0, "docker_skipped": "no dockerd", "rows": [
        {"name": "local cold", "p50_ms": 20.0, "execs_per_s": 40.0},
        {"name": "local pooled", "p50_ms": 6.0, "execs_per_s": 120.0},
    ]}
    measures = sandbox_measures(data)
    assert [(m.value, m.met) for m in measures] == [(20.0, True), (6.0, False), (120.0, True), (None, None)]
    assert measures[3].note == "not measured: no dockerd"


def test_batching_ratio_target_applies_to_concurrent_rows_only():
    rows = [{"concurrency": c, "ratio": r, "batched_tok_s": 1.0, "sequential_tok_s": 1.0} for c, r in ((1, 0.9), (8, 3.0))]
    measures = embedded_throughput_measures({"rows": rows})
    assert [(m.value, m.met) for m in measures] == [(0.9, None), (3.0, True)]


def test_spec_decode_keeps_the_best_draft_length_per_setting():
    row = {"temperature": 0.0, "concurrency": 1, "accept_rate": 1.0, "tok_s": 10.0}
    data = {"rows": [{**row, "draft_tokens": 0, "speedup": 1.0}, {**row, "draft_tokens": 2, "speedup": 1.4},
                     {**row, "draft_tokens": 3, "speedup": 1.2}]}
    (measure,) = spec_decode_measures(data)
    assert measure.value == 1.4 and measure.note.startswith("2 draft tokens")


def test_toy_mtp_rows_carry_no_target_and_the_spread_of_their_steps():
    data = {"settings": {"steps": 6}, "summary": {
        "with_mtp_sft": {"change_points": -2.5, "accept_start": 0.5, "accept_end": 0.475},
        "without_mtp_sft": {"change_points": -20.0, "accept_start": 0.5, "accept_end": 0.3},
    }, "runs": {"with_mtp_sft": [{"accept_rate": r} for r in (0.5, 0.6, 0.5, 0.5, 0.4, 0.5)]}}
    with_sft, without = mtp_measures(data)
    assert [with_sft.met, without.met] == [None, None]
    assert with_sft.note.startswith("toy") and "± 7.1 (1 SE)" in with_sft.note and "SE" not in without.note

