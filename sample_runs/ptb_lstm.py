"""The PTB word-level LSTM of Zaremba et al. (TensorFlow's ``ptb_word_lm`` tutorial) as a SavedModel.

Zaremba, Sutskever, Vinyals (2014), "Recurrent Neural Network Regularization". The model:
embedding -> ``num_layers`` LSTM layers (BasicLSTMCell equations, forget bias 0) -> softmax, all
weights uniform in ±init_scale, dropout on the inputs and on every layer's outputs when
keep_prob < 1 (training steps only). Its exported ``loss(inputs, targets)`` is the tutorial's
cost: cross-entropy summed over the time steps and divided by the batch size.

What we chose: every window starts from a zero LSTM state (truncated back-propagation over
``num_steps`` without carrying the state to the next window). The tutorial carries the final
state into the next window; doing that inside a SavedModel needs state variables of a fixed
batch size and a reset protocol, and it does not change the gradient dynamics this sample is
about (the gradient never flows across windows in either case).

The corpus is Tiny Shakespeare (public domain), lower-cased with punctuation split off, one
sentence a line as in Mikolov's PTB files; the vocabulary is the ``vocab_size - 2`` most frequent
words plus ``<unk>`` and ``<eos>``, shipped as the SavedModel asset ``vocab.txt``.
"""

from __future__ import annotations

import collections
import gzip
import re
from pathlib import Path

CONFIGS = {
    # init_scale, learning_rate, max_grad_norm, num_layers, num_steps, hidden_size, max_epoch,
    # max_max_epoch, keep_prob, lr_decay, batch_size, vocab_size: the tutorial's four configs.
    "small": dict(init_scale=0.1, learning_rate=1.0, max_grad_norm=5, num_layers=2, num_steps=20, hidden_size=200,
                  max_epoch=4, max_max_epoch=13, keep_prob=1.0, lr_decay=0.5, batch_size=20, vocab_size=10000),
    "medium": dict(init_scale=0.05, learning_rate=1.0, max_grad_norm=5, num_layers=2, num_steps=35, hidden_size=650,
                   max_epoch=6, max_max_epoch=39, keep_prob=0.5, lr_decay=0.8, batch_size=20, vocab_size=10000),
    "large": dict(init_scale=0.04, learning_rate=1.0, max_grad_norm=10, num_layers=2, num_steps=35, hidden_size=1500,
                  max_epoch=14, max_max_epoch=55, keep_prob=0.35, lr_decay=1 / 1.15, batch_size=20, vocab_size=10000),
    "test": dict(init_scale=0.1, learning_rate=1.0, max_grad_norm=1, num_layers=1, num_steps=2, hidden_size=2,
                 max_epoch=1, max_max_epoch=1, keep_prob=1.0, lr_decay=0.5, batch_size=20, vocab_size=10000),
}

CORPUS = Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"
TOKEN = re.compile(r"[a-z']+|[.,;:!?]")


def run_defaults(config: str) -> dict:
    """gradwatch options that reproduce the tutorial's training set-up for ``config``."""
    c = CONFIGS[config]
    return {
        "optimizer": "sgd",
        "lr": c["learning_rate"],
        "lr_decay": c["lr_decay"],
        "decay_after_epoch": c["max_epoch"],
        "batch_size": c["batch_size"],
        "num_steps": c["num_steps"],
        "shuffle": False,
    }


def corpus_lines(path: Path = CORPUS) -> list[str]:
    """Tiny Shakespeare in PTB style: lower case, punctuation as tokens, one sentence a line."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        text = handle.read().lower()
    lines = []
    for line in text.split("\n"):
        words = TOKEN.findall(line)
        if words:
            lines.append(" ".join(words))
    return lines


def build_vocab(lines: list[str], size: int) -> list[str]:
    counts = collections.Counter(w for line in lines for w in line.split())
    # most_common is ordered by count, ties by first appearance: deterministic for one corpus
    words = [w for w, _ in counts.most_common() if w not in ("<unk>", "<eos>")][: size - 2]
    return ["<unk>", "<eos>"] + words


def make_module(config: str, vocab_file: str, seed: int = 0):
    import tensorflow as tf

    c = CONFIGS[config]
    V, H, L, T = c["vocab_size"], c["hidden_size"], c["num_layers"], c["num_steps"]
    keep_prob, scale = c["keep_prob"], c["init_scale"]

    class PTBModel(tf.Module):
        def __init__(self):
            super().__init__(name="ptb_lstm")
            seeds = iter(range(seed * 1000, seed * 1000 + 100))

            def uniform(shape, name):
                value = tf.random.stateless_uniform(shape, seed=[next(seeds), 7], minval=-scale, maxval=scale)
                return tf.Variable(value, name=name)

            self.embedding = uniform([V, H], "embedding")
            self.kernels = [uniform([2 * H, 4 * H], f"lstm_{i}/kernel") for i in range(L)]
            self.biases = [uniform([4 * H], f"lstm_{i}/bias") for i in range(L)]
            self.softmax_w = uniform([H, V], "softmax_w")
            self.softmax_b = uniform([V], "softmax_b")
            self.vocab = tf.saved_model.Asset(vocab_file)
            # dropout masks come from a generator whose state is a variable of the model, so
            # restoring the model's variables also restores the dropout stream
            self.rng = tf.random.Generator.from_seed(seed)

        def _dropout(self, x, training):
            if not training or keep_prob >= 1.0:
                return x
            keep = self.rng.uniform(tf.shape(x)) < keep_prob
            return tf.where(keep, x / keep_prob, tf.zeros_like(x))

        def _logits(self, inputs, training):
            batch = tf.shape(inputs)[0]
            x = self._dropout(tf.nn.embedding_lookup(self.embedding, inputs), training)
            state = [(tf.zeros([batch, H]), tf.zeros([batch, H])) for _ in range(L)]
            outputs = []
            for t in range(T):
                h_in = x[:, t]
                for i in range(L):
                    c_prev, h_prev = state[i]
                    z = tf.matmul(tf.concat([h_in, h_prev], 1), self.kernels[i]) + self.biases[i]
                    ig, j, f, o = tf.split(z, 4, axis=1)
                    c_new = c_prev * tf.sigmoid(f) + tf.sigmoid(ig) * tf.tanh(j)  # forget bias 0
                    h_new = tf.tanh(c_new) * tf.sigmoid(o)
                    state[i] = (c_new, h_new)
                    h_in = self._dropout(h_new, training)
                outputs.append(h_in)
            output = tf.reshape(tf.stack(outputs, axis=1), [-1, H])
            return tf.reshape(tf.matmul(output, self.softmax_w) + self.softmax_b, [batch, T, V])

        @tf.function(input_signature=[tf.TensorSpec([None, T], tf.int32, name="inputs")])
        def __call__(self, inputs):
            """Logits [batch, num_steps, vocab] (inference: no dropout)."""
            return self._logits(inputs, training=False)

        @tf.function(input_signature=[tf.TensorSpec([None, T], tf.int32, name="inputs"),
                                      tf.TensorSpec([None, T], tf.int32, name="targets")])
        def loss(self, inputs, targets):
            """The tutorial's cost: cross-entropy summed over time steps, divided by batch size."""
            logits = self._logits(inputs, training=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            return tf.reduce_sum(ce) / tf.cast(tf.shape(inputs)[0], tf.float32)

    return PTBModel()


def build(out: Path, config: str = "small", seed: int = 0) -> dict:
    """Write ``out/model`` (SavedModel with assets/vocab.txt) and ``out/train.txt``."""
    import tensorflow as tf

    lines = corpus_lines()
    vocab = build_vocab(lines, CONFIGS[config]["vocab_size"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    module = make_module(config, str(vocab_file), seed)
    tf.saved_model.save(module, str(out / "model"))
    vocab_file.unlink()  # the model carries its own copy in assets/
    return {"model": "model", "data": "train.txt"}
