"""The causal recurrent networks: frames of filtered ECG -> per-frame beat classes (`BeatNet`), and the sequence
stages (`StageNet`): detected beats with their rhythm context -> each beat's AAMI class, each lead's windows ->
its rhythm.

Every frame (``frame_size`` samples at ``fs`` Hz) goes through a small dense encoder, a
unidirectional recurrent cell (LSTM, GRU or vanilla RNN) and a linear head over
``MODEL_CLASSES`` (background, N, S, V, F, Q). A beat whose R peak lies in frame ``f`` is
reported at frame ``f + output_delay_frames``, so the network sees that much signal after
the R peak before it decides. ``forward(frames, state)`` returns the new state, so a
stream can be run window by window.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import ModelConfig, StageConfig

State = tuple[Tensor, ...]


class BeatNet(nn.Module):
    """Frame encoder -> recurrent cell -> per-frame class logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Sequential(
            nn.Linear(config.frame_size, config.encoder_dim), nn.GELU(),
            nn.Linear(config.encoder_dim, config.encoder_dim), nn.GELU(),
        )
        cell_class = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
        self.rnn = cell_class(config.encoder_dim, config.hidden_size, num_layers=config.num_layers,
                              batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.num_classes)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def initial_state(self, batch_size: int) -> State:
        """Zero state on the network's device, each tensor of shape (num_layers, batch_size, hidden_size)."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = next(self.parameters()).device
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    def forward(self, frames: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Run a batch of frame sequences.

        Args:
            frames: (batch, time, frame_size) filtered ECG in mV.
            state: the recurrent state tensors, each (num_layers, batch, hidden_size).

        Returns:
            (logits of shape (batch, time, num_classes), *new_state).
        """
        hidden, new_state = self.recurrent(self.encoder(frames), state)
        return (self.head(self.dropout(hidden)), *new_state)

    def recurrent(self, cell_input: Tensor, state: State) -> tuple[Tensor, State]:
        """The recurrent cell alone: (batch, time, encoder_dim) -> hidden (batch, time, hidden_size), new state."""
        rnn_state = (state[0], state[1]) if self.config.cell == "lstm" else state[0]
        hidden, new_state = self.rnn(cell_input, rnn_state)
        return hidden, (tuple(new_state) if isinstance(new_state, tuple) else (new_state,))


class StageNet(nn.Module):
    """Per-step features -> dense layer -> GRU, one step per beat or window -> class logits (`config.classes`).

    The features are standardised inside the network (`feature_mean`, `feature_std`, set from the training
    steps), so the exported graph takes the raw features.
    """

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.config = config
        n_features = len(config.feature_names)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.encoder = nn.Sequential(nn.Linear(n_features, config.hidden_size), nn.GELU())
        self.rnn = nn.GRU(config.hidden_size, config.hidden_size, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, len(config.classes))

    def standardise_on(self, features: Tensor) -> None:
        """Set `feature_mean` and `feature_std` from the training steps' features (n, n_features)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0, unbiased=False) + 1e-6)

    def initial_state(self, batch_size: int) -> Tensor:
        """Zero state of shape (1, batch_size, hidden_size)."""
        return torch.zeros(1, batch_size, self.config.hidden_size, device=self.feature_mean.device)

    def forward(self, features: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """features (batch, steps, n_features), state (1, batch, hidden) -> logits (batch, steps, classes), state."""
        x = (features - self.feature_mean) / self.feature_std
        hidden, new_state = self.rnn(self.encoder(x), state)
        return self.head(self.dropout(hidden)), new_state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
