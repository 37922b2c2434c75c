"""deepzoo: the model families of MIT 6.S191 as one DVC-orchestrated, MLflow-tracked PyTorch pipeline."""


class DeepzooError(RuntimeError):
    """A failure the user can act on (unreachable tracking, a diverged training): reported in one line."""
