"""`previewd status` text: what each worker is doing, read at a glance."""

from previewd.status import format_text


def test_a_running_job_shows_run_checkpoint_prompt_step_elapsed_and_eta():
    job = {"id": 7, "run": "my_lora", "checkpoint": "my_lora_000000500.safetensors", "prompt_index": 2,
           "phase": "denoising", "denoise_step": 12, "denoise_steps": 25, "elapsed_seconds": 75.0,
           "eta_seconds": 3700.0}
    report = {"counts": {"running": 1, "queued": 3}, "running": [job], "failed": [], "rejected_inputs": [],
              "unreadable": [],
              "workers": [{"host": "box", "device": "cuda:0", "state": "live", "current_job": 7, "job": job,
                           "model": "qwen_image_2512", "heartbeat_age_seconds": 0.4, "pid": 9, "id": "box:9:a"}],
              "runs": [{"out_dir": "/runs/my_lora/previews", "queued": 3, "running": 1, "done": 4, "failed": 0,
                        "page": "/runs/my_lora/previews/index.html", "active": True}]}
    lines = format_text(report).splitlines()
    assert lines[0] == "jobs: queued 3, running 1"
    assert lines[1] == ("worker box cuda:0: live, job #7 my_lora my_lora_000000500.safetensors prompt 2: denoising "
                        "step 12/25, 1m15s elapsed, eta 1h01m, qwen_image_2512 loaded, heartbeat 0s ago (pid 9, box:9:a)")
    assert lines[2] == ("run /runs/my_lora/previews: 3 queued, 1 running, 4 done, 0 failed  "
                        "/runs/my_lora/previews/index.html")
