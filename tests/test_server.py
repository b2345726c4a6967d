"""The A1111 API server with a tiny model, through the `webuiapi` client from PyPI and plain HTTP: results equal
to the pipeline's, concurrent clients, interrupt, model switching, and bad requests that leave it serving."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import uvicorn
import webuiapi
from PIL import Image, ImageFilter

from ldm.infotext import read_infotext
from ldm.pipeline import Pipeline
from ldm.server.a1111 import API_NAMES, Limits
from ldm.server.app import ServerConfig, create_app
from ldm.server.worker import Cancelled, QueueFull, Worker
from ldm.settings import FIELDS, GenerationSettings
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "cfg_scale": 3, "width": 32, "height": 32}  # a 4 x 4 latent: milliseconds per step


class ThreadServer:
    """uvicorn serving `app` on a free local port from a thread, as scripts/serve.py serves it."""

    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Two tiny checkpoints with different weights, so that a model switch shows in the pixels."""
    folder = tmp_path_factory.mktemp("models")
    for seed, name in ((1, "tiny"), (2, "other")):
        torch.manual_seed(0)
        pipe = Pipeline.from_spec(tiny_spec(), name=name)
        randomize_(pipe.unet, seed=seed)
        pipe.save(folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    # Two processes' worth of threads on two shared cores run many times slower than one thread each.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(checkpoints, one_thread):
    config = ServerConfig(checkpoint=checkpoints / "tiny.safetensors", models_dir=checkpoints, max_queue=32,
                          max_body_bytes=4 * 2**20, limits=Limits(max_side=256, max_steps=150, max_images=8))
    with ThreadServer(create_app(config)) as s:
        yield s


@pytest.fixture(scope="module")
def pipe(checkpoints) -> Pipeline:
    return Pipeline.from_checkpoint(checkpoints / "tiny.safetensors")


def client(server: ThreadServer, **kwargs) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, **kwargs)


def post(server: ThreadServer, route: str, body: object, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=120, **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_webuiapi_txt2img_gives_the_pipelines_images_with_infotext(server, pipe):
    result = client(server).txt2img(prompt="a (red:1.2) circle", negative_prompt="blue", seed=5, batch_size=2,
                                    sampler_name="DPM++ 2M", scheduler="Karras", **FAST)
    settings = GenerationSettings(prompt="a (red:1.2) circle", negative_prompt="blue", seed=5, batch_size=2,
                                  sampler="dpmpp_2m", karras=True, steps=2, scale=3, width=32, height=32)
    expected = pipe.generate(settings, progress=False)
    assert [pixels(i).tolist() for i in result.images] == [pixels(i).tolist() for i in expected]
    info = result.info
    assert (info["all_seeds"], info["sampler_name"], info["sd_model_name"]) == ([5, 6], "DPM++ 2M", "tiny")
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert result.parameters["prompt"] == "a (red:1.2) circle" and result.parameters["cfg_scale"] == 3
    # Each PNG carries its infotext, which reads back into its own settings.
    text = result.images[1].info["parameters"]
    assert text == info["infotexts"][1]
    values, other = read_infotext(text)
    assert GenerationSettings(**values) == settings.image(1) and other["model"] == "tiny"


def test_img2img_and_inpainting_through_webuiapi(server, pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (0, 0, 16, 32))
    api = client(server)
    result = api.img2img(images=[init], prompt="a blue square", seed=3, denoising_strength=0.5,
                         sampler_name="Euler", **FAST)
    expected = pipe.generate(GenerationSettings(prompt="a blue square", seed=3, sampler="euler", steps=2, scale=3,
                                                init_img=init, strength=0.5), progress=False)
    assert pixels(result.images[0]).tolist() == pixels(expected[0]).tolist()
    assert result.info["denoising_strength"] == 0.5 and result.parameters["init_images"] is None

    result = api.img2img(images=[init], mask_image=mask, mask_blur=2, inpainting_mask_invert=1, prompt="a circle",
                         seed=3, denoising_strength=1.0, sampler_name="DDIM", **FAST)
    repaint = Image.eval(mask, lambda v: 255 - v).filter(ImageFilter.GaussianBlur(2))
    expected = pipe.generate(GenerationSettings(prompt="a circle", seed=3, steps=2, scale=3, init_img=init,
                                                mask=repaint, strength=1.0, eta=1.0), progress=False)  # webuiapi's eta
    assert pixels(result.images[0]).tolist() == pixels(expected[0]).tolist()
    assert "Mask blur: 2" in result.images[0].info["parameters"]
    # A 64 x 64 request stretches the init image, as A1111's resize_mode 0 does.
    assert api.img2img(images=[init], prompt="a", **{**FAST, "width": 64, "height": 64}).images[0].size == (64, 64)


def test_options_switch_the_model_and_list_models_samplers_schedulers(server):
    api = client(server)
    assert sorted(api.util_get_model_names()) == [f"other.safetensors [{m['hash']}]" for m in api.get_sd_models()
                                                  if m["model_name"] == "other"] + [
        f"tiny.safetensors [{m['hash']}]" for m in api.get_sd_models() if m["model_name"] == "tiny"]
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    before = api.txt2img(prompt="a red circle", seed=1, **FAST).images[0]
    try:
        api.util_set_model("other")
        assert api.util_get_current_model().startswith("other.safetensors [")
        after = api.txt2img(prompt="a red circle", seed=1, **FAST)
        assert after.info["sd_model_name"] == "other" and pixels(after.images[0]).tolist() != pixels(before).tolist()
        # One request on another model, as A1111's override_settings; the option stays.
        again = api.txt2img(prompt="a red circle", seed=1, override_settings={"sd_model_checkpoint": "tiny"}, **FAST)
        assert pixels(again.images[0]).tolist() == pixels(before).tolist()
        assert api.util_get_current_model().startswith("other.safetensors")
    finally:
        api.set_options({"sd_model_checkpoint": "tiny.safetensors"})
    response = post(server, "options", {"sd_model_checkpoint": "missing.safetensors"})
    assert response.status_code == 422 and "unknown checkpoint 'missing.safetensors'" in response.json()["detail"]


def test_png_info_reads_the_infotext_back(server):
    api = client(server)
    image = api.txt2img(prompt="a circle, small: yes", seed=9, sampler_name="Euler a",
                        override_settings={"CLIP_stop_at_last_layers": 2}, **FAST).image
    assert ", Clip skip: 2" in image.info["parameters"]
    result = api.png_info(image)
    assert result.info == image.info["parameters"]
    fields = result.json["parameters"]
    assert (fields["Prompt"], fields["Seed"], fields["Sampler"], fields["Size-1"]) == ("a circle, small: yes", "9",
                                                                                       "Euler a", "32")
    assert result.json["items"]["seed"] == "9"  # our own chunks too
    assert post(server, "png-info", {"image": b64(Image.new("RGB", (8, 8)))}).json()["info"] == ""


def test_interrupt_stops_the_running_job_and_progress_answers_meanwhile(server):
    api = client(server)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        running = pool.submit(api.txt2img, prompt="a circle", seed=1, n_iter=4,
                              **{**FAST, "steps": 150})
        deadline = time.monotonic() + 60
        while (state := api.get_progress())["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.02)
        assert state["state"]["job"] == "txt2img" and state["state"]["sampling_steps"] == 150
        assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 4
        assert api.interrupt() == {}
        result = running.result(timeout=60)
    interrupted_after = time.monotonic() - started
    assert len(result.images) < 4  # the unfinished batches are not returned
    alone = time.monotonic()
    api.txt2img(prompt="a circle", seed=1, **{**FAST, "steps": 150})
    assert interrupted_after < 4 * (time.monotonic() - alone)
    assert api.get_progress()["progress"] == 0


def test_concurrent_clients_each_get_what_they_would_get_alone(server):
    colors = ["red", "blue", "green", "pink", "cyan", "gray", "orange", "purple"]
    requests_ = [{"prompt": f"a {color} circle", "seed": 10 * c + r, "sampler_name": ["Euler a", "DDIM", "PLMS"][c % 3],
                  **FAST} for c, color in enumerate(colors) for r in range(3)]
    alone = [post(server, "txt2img", body).json()["images"] for body in requests_]

    def one_client(c: int) -> list[list[str]]:
        return [post(server, "txt2img", body).json()["images"] for body in requests_[3 * c:3 * c + 3]]

    progress = []
    with ThreadPoolExecutor(9) as pool:
        clients = [pool.submit(one_client, c) for c in range(8)]
        while not all(f.done() for f in clients):
            progress.append(requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).status_code)
        together = [images for f in clients for images in f.result()]
    assert together == alone and all(len(images) == 1 for images in together)
    assert progress and set(progress) == {200}


def test_a_client_that_goes_away_does_not_leave_its_job_running(server):
    body = json.dumps({"prompt": "a", **FAST, "steps": 150, "n_iter": 8}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    gone = time.monotonic()
    while requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]["job_count"]:
        assert time.monotonic() - gone < 10, "the job kept running"
        time.sleep(0.05)


def test_a_full_queue_answers_503(checkpoints, one_thread):
    config = ServerConfig(checkpoint=checkpoints / "tiny.safetensors", max_queue=1)
    with ThreadServer(create_app(config)) as s, ThreadPoolExecutor(3) as pool:
        long = {"prompt": "a", **FAST, "steps": 100}
        first = pool.submit(post, s, "txt2img", long)
        while requests.get(f"{s.url}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"] < 1:
            time.sleep(0.02)
        second = pool.submit(post, s, "txt2img", long)  # waits in the queue
        while requests.get(f"{s.url}/sdapi/v1/progress", timeout=10).json()["state"]["queued"] < 1:
            time.sleep(0.02)
        third = post(s, "txt2img", long)
        assert third.status_code == 503 and "the queue is full" in third.json()["detail"]
        requests.post(f"{s.url}/sdapi/v1/interrupt", timeout=10)
        assert first.result().status_code == 200
        requests.post(f"{s.url}/sdapi/v1/interrupt", timeout=10)
        assert second.result().status_code == 200


def test_the_worker_runs_tasks_in_order_and_skips_cancelled_ones():
    worker, ran = Worker(max_queue=3), []
    gate = threading.Event()
    first = worker.submit(lambda task: gate.wait(10))
    while worker.current is not first:
        time.sleep(0.01)
    tasks = [worker.submit(lambda task, k=k: ran.append(k)) for k in range(3)]
    with pytest.raises(QueueFull):
        worker.submit(lambda task: None)
    tasks[1].cancel()
    gate.set()
    first.future.result(10)
    tasks[2].future.result(10)
    assert ran == [0, 2]
    with pytest.raises(Cancelled):
        tasks[1].future.result(10)
    worker.close()
    assert not worker.thread.is_alive()


INIT = b64(Image.new("RGB", (32, 32)))


@pytest.mark.parametrize(("route", "body", "status", "detail"), [
    ("txt2img", {"prompt": 5}, 422, "prompt must be text, got 5"),
    ("txt2img", {"prompt": "a", "steps": "many"}, 422, "steps must be a whole number, got 'many'"),
    ("txt2img", {"prompt": "a", "cfg_scale": "high"}, 422, "cfg_scale must be a finite number, got 'high'"),
    ("txt2img", {"negative_prompt": "b"}, 422, "prompt is required"),
    ("txt2img", {"prompt": "a", "steps": 10**9}, 422, "steps must be at most 1000, got 1000000000"),
    ("txt2img", {"prompt": "a", "steps": 500}, 422, "steps must be at most 150 on this server, got 500"),
    ("txt2img", {"prompt": "a", "width": 100000}, 422, "width must be at most 8192, got 100000"),
    ("txt2img", {"prompt": "a", "height": 4096}, 422, "height must be at most 256 on this server, got 4096"),
    ("txt2img", {"prompt": "a", "width": 36}, 422, "width must be a positive multiple of 8, got 36"),
    ("txt2img", {"prompt": "a", "batch_size": -2}, 422, "batch_size must be >= 1, got -2"),
    ("txt2img", {"prompt": "a", "batch_size": 4, "n_iter": 3}, 422, "batch_size * n_iter must be at most 8"),
    ("txt2img", {"prompt": "a", "n_iter": 1.5}, 422, "n_iter must be a whole number"),
    ("txt2img", {"prompt": "a", "seed": -7}, 422, "seed must be >= 0, got -7"),
    ("txt2img", {"prompt": "a (red", "steps": 2}, 422, "unclosed '('"),
    ("txt2img", {"prompt": "a", "sampler_name": "DPM++ SDE"}, 422, "unknown sampler 'DPM++ SDE'"),
    ("txt2img", {"prompt": "a", "sampler_name": "DDIM", "scheduler": "Karras"}, 422, "karras sigmas work only"),
    ("txt2img", {"prompt": "a", "enable_hr": True}, 422, "enable_hr is not supported by this server"),
    ("txt2img", ["a"], 422, "the body must be a JSON object"),
    ("txt2img", "{not json", 422, "the body is not JSON"),
    ("img2img", {"prompt": "a"}, 422, "init_images must be a list of one base64 image"),
    ("img2img", {"prompt": "a", "init_images": ["%%%not base64"]}, 422, "init_images[0] is not valid base64"),
    ("img2img", {"prompt": "a", "init_images": [base64.b64encode(b"text").decode()]}, 422,
     "init_images[0] is not a readable image"),
    ("img2img", {"prompt": "a", "init_images": [INIT], "mask": b64(Image.new("L", (16, 32)))}, 422,
     "the mask is 16x32 but init_images[0] is 32x32; send a mask of the image's size"),
    ("img2img", {"prompt": "a", "init_images": [b64(Image.new("RGB", (512, 512)))]}, 422,
     "init_images[0] is 512x512; sides must be at most 256 on this server"),
    ("img2img", {"prompt": "a", "init_images": [INIT], "denoising_strength": 0}, 422,
     "denoising_strength must be in (0, 1]"),
    ("png-info", {"image": "???"}, 422, "image is not valid base64"),
    ("options", {"sd_model_checkpoint": 3}, 422, "sd_model_checkpoint must be a checkpoint title"),
    ("txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
     "CLIP_stop_at_last_layers must be >= 1, got 0"),
])
def test_bad_requests_get_a_one_line_reason_and_the_server_keeps_serving(server, route, body, status, detail):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{server.url}/sdapi/v1/{route}", data=data, timeout=60)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"] and "\n" not in response.json()["detail"]
    assert post(server, "txt2img", {"prompt": "a", **FAST, "steps": 1}).status_code == 200


def test_a_body_over_the_limit_is_refused_unread(server):
    response = requests.post(f"{server.url}/sdapi/v1/img2img", data=b"x" * (50 * 2**20), timeout=60)
    assert response.status_code == 413 and "larger than this server's limit of 4 MB" in response.json()["detail"]
    assert post(server, "txt2img", {"prompt": "a", **FAST, "steps": 1}).status_code == 200


def test_serve_script_with_api_auth(checkpoints, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--ckpt", str(checkpoints / "tiny.safetensors"),
               "--port", str(port), "--device", "cpu", "--api-auth", "ann:s3cret:x"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline().startswith(f"serving tiny.safetensors on http://127.0.0.1:{port}/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                response = requests.get(f"{url}/sdapi/v1/progress", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url, auth=("ann", "wrong"), timeout=5).status_code == 401
        assert requests.get(url, auth=("bob", "s3cret:x"), timeout=5).status_code == 401
        page = requests.get(url, auth=("ann", "s3cret:x"), timeout=5)
        assert page.status_code == 200 and "<html" in page.text
        result = webuiapi.WebUIApi(port=port, username="ann", password="s3cret:x").txt2img(prompt="a", **FAST)
        assert result.images[0].size == (32, 32)
    finally:
        process.terminate()  # uvicorn stops gracefully, then ends by the signal it caught
        output = process.communicate(timeout=30)[0]
    assert process.returncode == -15 and "Traceback" not in output, output


@pytest.mark.parametrize(("flags", "message"), [
    (["--api-auth", "nopassword"], "--api-auth must be USER:PASS, got 'nopassword'"),
    (["--max_queue", "0"], "--max_queue must be >= 1, got 0"),
    (["--ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (["--ckpt", "BROKEN"], "cannot read"),
])
def test_serve_script_flags_are_checked_in_one_line(flags, message, capsys, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import serve

    from ldm.cli import run_main

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert run_main(serve.main, [str(broken) if flag == "BROKEN" else flag for flag in flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_every_setting_has_a_request_name_for_messages():
    assert set(API_NAMES) == set(FIELDS)


def test_serve_listens_on_the_loopback_by_default():
    sys.path.insert(0, str(ROOT / "scripts"))
    import serve

    args = serve.build_parser().parse_args([])
    assert (args.host, args.port, args.api_auth) == ("127.0.0.1", 7860, None)


def test_loras_and_embeddings_are_listed_and_prompts_use_them(checkpoints, one_thread, tmp_path):
    from safetensors.torch import save_file

    from tests.test_lora import kohya_lora

    pipe = Pipeline.from_checkpoint(checkpoints / "tiny.safetensors")
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    save_file(kohya_lora(pipe, seed=3), str(tmp_path / "loras" / "style.safetensors"), metadata={"ss_note": "x"})
    rows = pipe.text_encoder.token_embedding.weight[pipe.text_encoder.tokenizer.encode("red circle")]
    save_file({"emb_params": rows.detach().clone()}, str(tmp_path / "embeddings" / "redthing.safetensors"))
    config = ServerConfig(checkpoint=checkpoints / "tiny.safetensors", lora_dir=tmp_path / "loras",
                          embeddings_dir=tmp_path / "embeddings")
    with ThreadServer(create_app(config)) as s:
        listed = requests.get(f"{s.url}/sdapi/v1/loras", timeout=30).json()
        assert [(row["name"], row["metadata"]) for row in listed] == [("style", {"ss_note": "x"})]
        embeddings = requests.get(f"{s.url}/sdapi/v1/embeddings", timeout=30).json()["loaded"]
        assert {name: row["vectors"] for name, row in embeddings.items()} == {"redthing": 2}
        tagged = post(s, "txt2img", {"prompt": "a redthing <lora:style:0.6>", "seed": 3, **FAST}).json()
        infotext = json.loads(tagged["info"])["infotexts"][0]
        assert 'Lora hashes: "style: ' in infotext and 'TI hashes: "redthing: ' in infotext
        plain = post(s, "txt2img", {"prompt": "a red circle ", "seed": 3, **FAST}).json()
        missing = post(s, "txt2img", {"prompt": "a <lora:gone>", **FAST})
    pipe.lora_dir = tmp_path / "loras"
    pipe.load_embeddings(tmp_path / "embeddings")
    values, _ = read_infotext(infotext)  # what the server ran, through the pipeline with the same files
    expected = pipe.generate(GenerationSettings(**values), progress=False)[0]
    assert pixels(Image.open(io.BytesIO(base64.b64decode(tagged["images"][0])))).tolist() == pixels(expected).tolist()
    assert tagged["images"][0] != plain["images"][0]
    assert missing.status_code == 422 and "<lora:gone> names no file in" in missing.json()["detail"]
