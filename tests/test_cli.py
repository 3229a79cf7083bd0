import json
import subprocess
import sys


def _lab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=timeout)


def test_selftest_command_passes_and_prints_one_line_per_op():
    from lab.engine.opcheck import CASES
    r = _lab("selftest", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok  ") == len(CASES)
    assert f"{len(CASES)} of {len(CASES)} ops passed" in r.stdout


def test_bench_kernels_writes_json_with_ratios(tmp_path):
    out = tmp_path / "k.json"
    r = _lab("bench", "kernels", "--backend", "numpy", "--sizes", "64,96", "--budget", "0.01", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    ops = [row["op"] for row in data["rows"]]
    assert ops[:2] == ["matmul 64x64x64", "matmul 96x96x96"] and any(o.startswith("layernorm") for o in ops)
    for row in data["rows"]:
        assert row["lab"] > 0 and row["numpy"] > 0
        assert abs(row["lab/numpy"] - row["lab"] / row["numpy"]) < 1e-9


def test_train_command_reports_decreasing_loss(tmp_path):
    r = _lab("train", "--steps", "40", "--eval-every", "20", "--backend", "numpy", "--no-progress")
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("done:")][0]
    first, last = (float(v) for v in line.split("train loss ")[1].split(",")[0].split(" -> "))
    assert last < first - 0.3


def test_help_everywhere():
    for args in ([], ["train"], ["selftest"], ["bench"], ["info"]):
        r = _lab(*args, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_unknown_preset_is_a_clear_error():
    r = _lab("train", "--preset", "huge", "--steps", "1", "--backend", "numpy")
    assert r.returncode != 0 and "unknown preset 'huge'" in r.stderr


def test_bench_lora_reports_projection(tmp_path):
    out = tmp_path / "l.json"
    r = _lab("bench", "lora", "--backend", "numpy", "--steps", "2", "--rank", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["trainable_parameters"] < data["parameters"] / 5
    assert abs(data["minutes_per_million_tokens"] - 1e6 / data["lora_tokens_per_s"] / 60) < 1e-6
    assert "1 M tokens of adapter training" in r.stdout


def test_train_saves_a_checkpoint_that_generate_reads(tmp_path):
    r = _lab("train", "--steps", "3", "--backend", "numpy", "--no-progress", "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    g = _lab("generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "And", "--max-new-tokens", "10",
             "--seed", "1", "--backend", "numpy")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("And") and len(g.stdout.rstrip("\n")) == 13
    bad = _lab("generate", "--checkpoint", str(tmp_path / "nope"), "--backend", "numpy")
    assert bad.returncode != 0 and "no such checkpoint directory" in bad.stderr


def test_plan_answers_the_m1_question_in_one_command():
    r = _lab("plan", "--preset", "tiny", "--tokens", "1e6", "--lora-rank", "8", "--device", "m1", "--minutes", "10")
    assert r.returncode == 0, r.stderr
    assert "Apple M1" in r.stdout and "spec-derived" in r.stdout and "65,536 trainable" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("answer: yes")
    bad = _lab("plan", "--device", "tpu")
    assert bad.returncode != 0 and "unknown device profile 'tpu'" in bad.stderr
