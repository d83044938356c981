"""Multi-query associative recall (Zoology, Arora et al. 2023) with a 2-layer Transformer.

    python launch.py --config=configs/mqar.py                 # the quickstart run (CPU)
    python launch.py --config=configs/mqar.py:quick           # a few steps, smoke test
    python launch.py --config=configs/mqar.py:full            # accelerator (Zoology sizes)
    python launch.py --config=configs/mqar.py:quick,seq_len=128,num_kv_pairs=8
    python launch.py --config=configs/mqar.py --config.model.attention=dot_product
    python launch.py --config=configs/mqar.py --sweep                 # grid: get_sweep()
    python launch.py --config=configs/mqar.py --sweep --sweep_backend=optuna --optuna_trials=20

Sizes follow Zoology's smallest setting: sequence length 64, 4 key-value pairs, vocabulary
8192, model width 64 with one attention head per layer and, as in Zoology's attention
models, attention-only layers (``mlp_dim=0``).

The recipe is the same at every width: rotary positions (RoPE), no MLP, 2,000 steps of
batch 32, and muP's learning-rate rule for Adam (``optim.lr_reference_width=64``: the
hidden matrices learn at ``learning_rate * 64 / width``, embeddings and norms at
``learning_rate``), the learning rate swept per (width, length) cell
(``experiments/mqar_table.py``).

Learned absolute positions let the model take a shortcut: the key-value pairs sit at the
same positions in every example, so attending to the value slots by position alone gives
the 1-in-4 guess. A width-64 model with an MLP escapes that plateau within 2,000 steps;
from width 128 on it locks into it (the first layer's attention collapses onto one
position, no previous-token head forms) and stays at ~0.25. Relative positions offer no
such shortcut and make the previous-token head a single rotation. Width 256 then still
needs the muP rule (at one rate for every weight it stalls at 3e-3 and learns too slowly
at 1.5e-3) and about 1,000 steps on the plateau before recall forms.
"""

import ml_collections

from configs import common

ARGUMENTS = {
    "seq_len": (None, int),
    "num_kv_pairs": (None, int),
    "width": (None, int),
    "num_layers": (None, int),
    "attention": (None, str),
}


def _arguments(arg: str | None) -> ml_collections.ConfigDict:
    return common.variant(arg, "configs/mqar.py", **ARGUMENTS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: named arguments (``configs.common.parse_arg``): ``quick`` (an 8-step
    smoke test) or ``full`` (Zoology's largest setting: length 512, 64 pairs, width 256,
    batch 512), neither: the CPU quickstart run; then ``seq_len=``, ``num_kv_pairs=``,
    ``width=``, ``num_layers=``, ``attention=`` (a kernel name), e.g.
    ``configs/mqar.py:quick,seq_len=128``."""
    args = _arguments(arg)
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "mqar"
    common.lm_packing(config.data)
    config.data.vocab_size = 8192
    config.data.seq_len = 64
    config.data.num_kv_pairs = 4
    config.data.num_train = 100_000
    config.data.num_eval = 2_048

    config.model = common.model_config()
    config.model.attention = "auto"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 64
    config.model.num_layers = 2
    config.model.num_heads = 1
    config.model.mlp_dim = 0  # attention-only layers, as in Zoology
    config.model.positions = "rope"
    config.model.scan_layers = False  # True: one nn.scan over the layers
    config.model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"

    config.optim.learning_rate = 3e-3
    config.optim.lr_reference_width = 64  # hidden matrices: 3e-3 * 64 / width (muP)
    config.optim.weight_decay = 0.0
    config.train.steps = 2000
    config.train.batch_size = 32
    if args.quick:
        config.data.num_train = 512
        config.data.num_eval = 64
        config.train.steps = 8
        config.train.batch_size = 16
        config.train.log_every = 2
        config.train.eval_every = 4
        config.train.checkpoint_every = 4
        config.optim.warmup_steps = 2
    elif args.full:  # Zoology's largest setting, for an accelerator
        config.data.seq_len = 512
        config.data.num_kv_pairs = 64
        config.data.num_eval = 3_072
        config.model.width = 256
        config.train.batch_size = 512
        config.train.steps = 12_500  # 64 epochs of the 100,000 training examples
        config.train.eval_every = 1_250
        config.train.checkpoint_every = 1_250
        config.optim.learning_rate = 3e-3  # hidden matrices at 7.5e-4 (width 256)
    for name, field in (
        ("seq_len", config.data),
        ("num_kv_pairs", config.data),
        ("width", config.model),
        ("num_layers", config.model),
        ("attention", config.model),
    ):
        if args[name] is not None:
            field[name] = args[name]
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """Trials for ``launch.py --sweep``: learning rate x positions (2 quick trials)."""
    from attn_jax.train.sweep import product

    if _arguments(arg).quick:
        return product(**{"optim.learning_rate": [1e-3, 3e-3]})
    return product(
        **{"optim.learning_rate": [1e-3, 3e-3, 1e-2], "model.positions": ["learned", "rope"]}
    )


def get_search_space(arg: str | None = None) -> dict:
    """Search space for ``launch.py --sweep --sweep_backend=optuna``."""
    from attn_jax.train.optuna_search import categorical, integers, log_uniform

    if _arguments(arg).quick:
        return {"optim.learning_rate": log_uniform(1e-3, 1e-2)}
    return {
        "optim.learning_rate": log_uniform(3e-4, 1e-2),
        "optim.warmup_steps": integers(0, 300),
        "model.positions": categorical(["learned", "rope"]),
    }
