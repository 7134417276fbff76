"""MLflow has no TFLite flavor: this models-from-code file makes a `.tflite` a pyfunc model.

It is copied into every logged TFLite model and imports only numpy, mlflow and ai_edge_litert,
so `mlflow.pyfunc.load_model("models:/<name>-tflite-int8@production")` works wherever those are
installed. Input: float32 images already preprocessed (see the `preprocessing` artifact),
NHWC [N, H, W, 3] or NCHW [N, 3, H, W]. Output: float32 logits [N, num_classes].
An app-ready file (`"input": "pixels"` in its preprocessing) takes the same normalized input here, mapped
back to RGB pixels 0..255 before the interpreter sees it, so every variant of a model takes one batch.
"""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TFLiteClassifier(PythonModel):
    def load_context(self, context):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=context.artifacts["tflite"], num_threads=2)
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        with open(context.artifacts["preprocessing"]) as f:
            self.preprocessing = json.load(f)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named-tensor signature hands over {"image": array}
            model_input = next(iter(model_input.values()))
        x = np.asarray(model_input, dtype=np.float32)
        size = int(self.inp["shape"][1])
        if x.ndim == 3:
            x = x[None]
        if x.shape[1] == 3 and x.shape[-1] != 3:  # NCHW -> NHWC
            x = x.transpose(0, 2, 3, 1)
        if x.shape[1:] != (size, size, 3):
            raise ValueError(f"expected images of shape [N, {size}, {size}, 3], got {list(x.shape)}")
        pre = self.preprocessing
        if pre.get("input") == "pixels":
            x = (x * np.asarray(pre["std"], np.float32) + np.asarray(pre["mean"], np.float32)) / pre["scale"]
            if self.inp["dtype"] == np.uint8:
                x = np.clip(np.round(x), 0, 255).astype(np.uint8)
        outputs = []
        for img in x:
            self.interpreter.set_tensor(self.inp["index"], np.ascontiguousarray(img[None]))
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self.out["index"])[0].astype(np.float32))
        return np.stack(outputs)


mlflow.models.set_model(TFLiteClassifier())
