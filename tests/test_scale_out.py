"""Scale-out as the README gives it: lmms-eval's data parallelism through torchrun (two gloo ranks on the CPU give
the answers and score of one process), a sweep through Hydra's submitit launcher (each job a process of its own,
records and summary as with the basic launcher), and the Slurm launcher config resolved into an sbatch script."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from test_harness import DEMO_MODEL, ROOT
from visiondrop.harness import TASKS_DIR
from visiondrop.harness.store import ResultStore

README = (ROOT / "docs" / "experiments.md").read_text()  # the README's "multi-GPU and Slurm" section
MULTI_GPU = "torchrun --nproc_per_node 8 -m lmms_eval --model pruned_lvlm --model_args"
SLURM = "python scripts/run.py -m experiment=table1 hydra/launcher=slurm"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def lmms_eval(tmp_path, launcher: list[str], out: str) -> tuple[dict, dict, str]:
    """The README's command on the demo model and task: (results, {doc_id: filtered answer}, its log)."""
    command = [*launcher, "-m", "lmms_eval", "--model", "pruned_lvlm", "--model_args",
               f"pretrained={DEMO_MODEL},method=visiondrop,budget=64", "--tasks", "visiondrop_demo",
               "--include_path", str(TASKS_DIR), "--limit", "8", "--batch_size", "2", "--output_path",
               str(tmp_path / out), "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, env={**ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=600)
    results = sorted((tmp_path / out).rglob("*_results.json"))
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / out).rglob("*_samples_*.jsonl")).open()]
    return json.loads(results[0].read_text()), {s["doc_id"]: s["filtered_resps"] for s in samples}, done.stdout + done.stderr


def test_two_gloo_ranks_give_the_answers_and_score_of_one_process(tmp_path):
    assert MULTI_GPU in README
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # --standalone: a free rendezvous port, so a busy 29500 (another run on the machine) cannot break the ranks
    ranks, ranks_answers, log = lmms_eval(tmp_path, [torchrun, "--standalone", "--nproc_per_node", "2"], "two_ranks")
    assert "Running on rank 1" in log  # two processes shared the docs
    one, one_answers, _ = lmms_eval(tmp_path, [sys.executable], "one_process")
    assert sorted(ranks_answers) == list(range(8)) and ranks_answers == one_answers
    assert ranks["results"]["visiondrop_demo"]["exact_match,none"] == one["results"]["visiondrop_demo"][
        "exact_match,none"]
    assert ranks["n-samples"] == one["n-samples"] == {"visiondrop_demo": {"original": 160, "effective": 8}}


def test_a_sweep_through_the_submitit_launcher(tmp_path):
    """`hydra/launcher=submitit_local` (the Slurm launcher's local twin): each job runs in its own process through
    submitit; the records and the sweep summary are those of the basic launcher."""
    command = [sys.executable, str(ROOT / "scripts" / "run.py"), "-m", "hydra/launcher=submitit_local",
               "method=fastv,visiondrop", "budget=192", "limit=2", f"model.pretrained={DEMO_MODEL}",
               f"results_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/sweep"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "sweep" / "summary.txt").read_text()
    assert summary.startswith("2 job(s): 2 ran, 0 skipped as done"), summary
    records = ResultStore(tmp_path / "runs").records()
    assert sorted(r["method"] for r in records) == ["fastv", "visiondrop"]
    assert all(r["path"] in summary and r["docs"] == 2 and r["budget"] == 192.0 for r in records)
    jobs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(jobs) == 2  # one submitit job (a process of its own) per sweep job


def test_the_slurm_launcher_config_resolves_into_an_sbatch_script(tmp_path, monkeypatch):
    """configs/hydra/launcher/slurm.yaml composed as the README's command composes it, the launcher instantiated
    and its parameters given to submitit's Slurm executor as the launcher gives them; no cluster (a stand-in
    `srun` on the PATH satisfies the executor's check)."""
    import hydra.utils
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    assert SLURM in README
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1", "hydra/launcher=slurm",
                                           f"hydra.sweep.dir={tmp_path}/sweep"], return_hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)  # as BaseSubmititLauncher.launch builds its executor
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u job.py", "0")
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --time=720", "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={tmp_path}/sweep/.submitit/"):
        assert line in script, script
    assert "#SBATCH --partition" not in script  # null until set for the cluster
