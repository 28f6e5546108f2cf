import json
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from herd import checkpoint
from herd.checkpoint import hf_to_herd, transposed_in_hf
from herd.config import ModelConfig, RopeScaling, preset, to_hf_dict
from herd.model import Transformer
from herd.tokenizer import Tokenizer

PICO = Path(__file__).resolve().parents[1] / "models" / "herd-pico"

torch.set_num_threads(min(4, torch.get_num_threads()))


def small_config(**changes) -> ModelConfig:
    """A tiny random config whose vocab is small enough for fast reference runs."""
    base = preset("tiny").replace(vocab_size=512, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                                  rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                           original_max_position_embeddings=32))
    return base.replace(**changes)


def random_model(seed: int = 0, **changes) -> Transformer:
    """A tiny random herd model whose logits are peaked, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = Transformer(small_config(**changes)).eval()
    model.init_weights(std=0.08)
    return model


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` by full forwards, no cache: the reference every decode path must give."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_text_model(cfg: ModelConfig, seed: int = 0):
    """A transformers Llama4ForCausalLM with random weights for ``cfg`` (eager attention: the plain reference)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    d = to_hf_dict(cfg, text_only=True)
    d.pop("model_type"), d.pop("architectures")
    hf_cfg = Llama4TextConfig(**d)
    hf_cfg._attn_implementation = "eager"
    return randomize_(Llama4ForCausalLM(hf_cfg).eval())


@torch.no_grad()
def randomize_(model):
    """HF leaves some tensors at zero/one; give every weight a scale that exercises it (norms around 1)."""
    for name, p in model.named_parameters():
        if "layernorm" in name or name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.08)
    return model


def herd_from_hf(hf_model, cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg).eval()
    state = {hf_to_herd(k): v for k, v in hf_model.state_dict().items()}
    state = {k: v.transpose(1, 2) if transposed_in_hf(model, k) else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny random model directory with herd-pico's tokenizer (6144 ids: its BPE and the Llama 4 chat tokens),
    shared by the post-training tests of a session (do not change it)."""
    d = tmp_path_factory.mktemp("post") / "base"
    tok = Tokenizer.load(PICO / "tokenizer.model")
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                 eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    checkpoint.save(Transformer(cfg), d)
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path / "model"


def text_recipe(tmp_path, **sections) -> dict:
    """A training recipe over one small text file: the tiny preset with 2 layers, 2 steps; each keyword is a
    recipe section whose keys are merged over these defaults."""
    text = tmp_path / "a.txt"
    text.write_text("the king and the queen speak of love and death. " * 200)
    recipe = {"model": {"preset": "tiny", "n_layers": 2, "vocab_size": 202048},
              "data": {"seq_len": 32, "batch_size": 2, "sources": [{"files": [str(text)]}]},
              "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "tensorboard": False, "log_every": 1}}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def check_resume_is_exact(make, tmp_path, steps: int = 4, stop: int = 2, keys: tuple[str, ...] = ("loss",)):
    """``make(out, steps, resume=False)`` builds a trainer. A run stopped at ``stop`` (its checkpoint) and resumed
    logs the uninterrupted run's ``keys`` at every step and ends with its weights, bit for bit."""
    import json

    whole = make(tmp_path / "a", steps)
    whole.fit()
    make(tmp_path / "b", stop).fit()
    resumed = make(tmp_path / "b", steps, resume=True)
    assert resumed.step == stop
    resumed.fit()

    def rows(run):
        logged = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [tuple(r[k] for k in keys) for r in logged if "loss" in r]

    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == steps
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    return whole, resumed


@contextmanager
def live(llm, name="herd-pico", **options):
    """A uvicorn server on a free loopback port in this process; yields (base URL, app)."""
    import uvicorn

    from herd.serve.app import create_app

    app = create_app(llm, name, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class FakeEndpoint(BaseHTTPRequestHandler):
    """The shell of a scripted OpenAI-compatible server (subclasses answer do_POST): /v1/models lists ``MODEL``,
    ``reply`` sends JSON; ``serving(cls)`` runs one on a free loopback port and yields (server, base URL)."""

    MODEL = "fake"

    def do_GET(self):
        self.reply({"object": "list", "data": [{"id": self.MODEL, "object": "model", "created": 0,
                                                "owned_by": "tests"}]})

    def body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def reply(self, obj):
        raw = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()

