"""The code MLflow saves with a registered avsiam model ("models from code": no pickle in the
model), run when the model is loaded: the model is :class:`~avsiam.eval.serving.ClipLabelModel`."""

from mlflow.models import set_model

from avsiam.eval.serving import ClipLabelModel

set_model(ClipLabelModel())
