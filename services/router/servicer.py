"""The Router gRPC service: decode a batch of features, score it with the loaded strategy, answer.

Scoring runs inline on the event loop: a batch costs well under a millisecond on CPU, less than a
hop to a thread pool would, and the service is stateless so there is nothing else to wait for.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Sequence

import grpc

from r2r_serve.common.logging import get_logger
from r2r_serve.common import metrics
from r2r_serve.proto import common_pb2, router_pb2, router_pb2_grpc
from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.strategies import RouterStrategy

log = get_logger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, strategy: RouterStrategy):
        self.strategy = strategy

    def score_features(self, features: Sequence[common_pb2.RouterFeatures], batch_id: int = 0) -> router_pb2.ScoreResponse:
        """Decode + score one batch; ValueError when the features break the contract."""
        start = time.perf_counter()
        s = self.strategy
        batch = FeatureBatch.from_protos(features, expect_hidden=s.hidden_size or None,
                                         expect_top_k=s.top_k or None, require_tensors=s.reads_tensors)
        probs = s.score(batch).tolist() if len(batch) else []
        elapsed = time.perf_counter() - start
        metrics.ROUTER_BATCH_SIZE.observe(len(probs))
        metrics.ROUTER_SCORE_SECONDS.observe(elapsed)
        return router_pb2.ScoreResponse(batch_id=batch_id, probabilities=probs, score_ms=elapsed * 1000.0)

    async def Score(self, request: router_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> router_pb2.ScoreResponse:
        try:
            return self.score_features(request.features, request.batch_id)
        except ValueError as e:
            log.warning("bad batch", batch_id=request.batch_id, size=len(request.features), error=str(e))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("scoring failed", batch_id=request.batch_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

    async def ScoreStream(self, request_iterator: AsyncIterator[router_pb2.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.ScoreResponse]:
        # One bad batch must not cost the caller its stream: answer it with `error` and carry on.
        async for request in request_iterator:
            try:
                yield self.score_features(request.features, request.batch_id)
            except ValueError as e:
                log.warning("bad batch", batch_id=request.batch_id, size=len(request.features), error=str(e))
                yield router_pb2.ScoreResponse(batch_id=request.batch_id, error=str(e))
            except Exception as e:  # a bug in scoring: report it on this batch, keep the stream
                log.exception("scoring failed", batch_id=request.batch_id)
                yield router_pb2.ScoreResponse(batch_id=request.batch_id, error=f"internal error: {e}")

    async def GetInfo(self, request: router_pb2.GetRouterInfoRequest, context: grpc.aio.ServicerContext) -> router_pb2.RouterInfo:
        s = self.strategy
        return router_pb2.RouterInfo(strategy=s.name, slm_name=s.slm_name, llm_name=s.llm_name,
                                     slm_tokenizer_fingerprint=s.slm_tokenizer_fingerprint,
                                     hidden_size=s.hidden_size, top_k=s.top_k,
                                     default_threshold=s.default_threshold, checkpoint=s.checkpoint,
                                     threshold_curve=[router_pb2.ThresholdPoint(threshold=t, recall=r, llm_share=share)
                                                      for t, r, share in s.threshold_curve()])
