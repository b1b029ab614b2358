"""peers-ml: the ``ml`` workload of bench/peers/workload.py behind the failoverd model protocol.

bench/peers/run.py builds this bundle from an example release (fraud-ml-sklearn or fraud-ml-onnx):
the release's data (the fitted model file), lock and wheels as they are, its code/model.py renamed
release_model.py, workload.py next to it, and this file as code/model.py. So the score is the
release's own ``predict`` over the whole batch (one vectorized call), and the per-card state is the
peers workload's.
"""

from daemon.model import Prediction
from workload import release_class, step_scored  # copied next to this file by bench/peers/run.py


class PeersMLScorer:
    def __init__(self, context):
        self.release = release_class()(context)

    def predict(self, batch):
        out = []
        for record, p in zip(batch, self.release.predict(batch), strict=True):
            if not isinstance(p, Prediction):  # the release refused the record: dead-letter it as the release does
                out.append(p)
                continue
            output, state = step_scored(record.state, record.value, p.output["score"])
            out.append(Prediction(output, state))
        return out

    def health_check(self):
        return True
