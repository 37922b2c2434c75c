"""deepzoo: the model families of MIT 6.S191 as one DVC-orchestrated, MLflow-tracked PyTorch pipeline."""
