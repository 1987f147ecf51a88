"""A site's side of secure aggregation: the key exchange and the unmasking, over NVFlare aux messages.

`SecAggClient` lives in the site's job process (one per job, component id `CLIENT_COMPONENT_ID`). The server
drives each round (fedllm.flare.secagg.server): it relays every message, so sites never connect to each other.
Per round the site holds one `SiteSession` (fedllm.flare.secagg.protocol) with fresh keys, and forgets it once
it has answered the unmasking request. The filters (fedllm.flare.secagg.filters) use the same component: the
input filter leaves the received global model here, the output filter masks the update with this round's
session. The threshold, clip and weight scale are the job's (given to this component when the job was
created), not the server's word: a server cannot talk a site into a lower threshold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable, make_reply

from fedllm.flare.faults import site_crash_point
from fedllm.flare.secagg.protocol import SecAggError, SecAggParams, SiteSession

CLIENT_COMPONENT_ID = "fedllm_secagg_client"
# Aux topics, one per stage the server drives (Bonawitz et al. 2017, semi-honest; design §1.3).
TOPIC_ADVERTISE = "fedllm.secagg.advertise"
TOPIC_SHARE_KEYS = "fedllm.secagg.share_keys"
TOPIC_ROUTE = "fedllm.secagg.route"
TOPIC_UNMASK = "fedllm.secagg.unmask"
PAYLOAD = "payload"  # the stage's message, a plain dict (FOBS carries dict/list/str/int/bytes)
ERROR = "error"  # a refused stage: the site's reason, shown in the server's log


def reply_with(payload: Any) -> Shareable:
    reply = make_reply(ReturnCode.OK)
    reply[PAYLOAD] = payload
    return reply


class SecAggClient(FLComponent):
    """Answers the server's secure-aggregation stages; holds this round's session and received global."""

    def __init__(self, threshold: int, clip: float = 1.0, max_weight: float | None = None):
        super().__init__()
        self.threshold = int(threshold)
        self.clip = float(clip)
        self.max_weight = max_weight
        self._lock = threading.Lock()
        self._sessions: dict[int, SiteSession] = {}
        self._globals: dict[int, dict[str, Any]] = {}
        self._site = ""
        self._job_id = ""

    def params(self) -> SecAggParams:
        extra = {} if self.max_weight is None else {"max_weight": float(self.max_weight)}
        return SecAggParams(threshold=self.threshold, clip=self.clip, **extra)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._site = fl_ctx.get_identity_name()
            self._job_id = str(fl_ctx.get_job_id())
            engine = fl_ctx.get_engine()
            for topic, stage in (
                (TOPIC_ADVERTISE, self._advertise),
                (TOPIC_SHARE_KEYS, self._share_keys),
                (TOPIC_ROUTE, self._route),
                (TOPIC_UNMASK, self._unmask),
            ):
                engine.register_aux_message_handler(topic, self._handler(topic, stage))
        elif event_type == EventType.END_RUN:
            with self._lock:
                self._sessions.clear()
                self._globals.clear()

    # ---- what the filters use ------------------------------------------------------------------

    @property
    def site(self) -> str:
        return self._site

    def remember_global(self, round_num: int, params: dict[str, Any]) -> None:
        """The global weights this round's update is measured against (only the latest round is kept)."""
        with self._lock:
            self._globals = {round_num: params}

    def received_global(self, round_num: int) -> dict[str, Any]:
        with self._lock:
            if round_num not in self._globals:
                raise SecAggError(
                    f"secure aggregation: {self._site} has no global model of round {round_num} to measure its "
                    "update against (the input filter did not see the round's task); nothing is sent"
                )
            return self._globals[round_num]

    def session(self, round_num: int) -> SiteSession:
        """This round's session; raises SecAggError if the site missed the round's key exchange."""
        with self._lock:
            session = self._sessions.get(round_num)
        if session is None:
            raise SecAggError(
                f"secure aggregation: {self._site} holds no keys for round {round_num} (it missed the round's key "
                "exchange); its update is not sent, so it counts as dropped for this round"
            )
        return session

    def latest_round(self) -> int | None:
        with self._lock:
            return max(self._sessions, default=None)

    # ---- the stages ----------------------------------------------------------------------------

    def _handler(self, topic: str, stage: Callable[[dict], Any]) -> Callable[[str, Shareable, FLContext], Shareable]:
        def handle(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:  # NVFlare passes keywords
            try:
                return reply_with(stage(request.get(PAYLOAD) or {}))
            except Exception as exc:  # refused: the server counts this site as not answering, with the reason
                self.log_error(fl_ctx, f"secure aggregation, {topic}: {exc}")
                reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
                reply[ERROR] = str(exc)
                return reply

        return handle

    def _advertise(self, message: dict) -> dict:
        round_num, sites = int(message["round"]), [str(s) for s in message["sites"]]
        session = SiteSession(self._site, round_num, self._job_id, self.params())
        keys = session.advertise(sites)
        with self._lock:
            self._sessions = {round_num: session}  # fresh keys every round; an older round's are gone
        return keys

    def _share_keys(self, message: dict) -> dict:
        return self.session(int(message["round"])).share_keys(message["public_keys"])

    def _route(self, message: dict) -> dict:
        self.session(int(message["round"])).receive_shares(message["sealed"], [str(s) for s in message["u2"]])
        return {"ok": True}

    def _unmask(self, message: dict) -> dict:
        round_num = int(message["round"])
        site_crash_point("secagg-unmask", self._site, round_num)  # a test hook, inert unless set
        session = self.session(round_num)
        shares = session.reveal([str(s) for s in message["u3"]], [str(s) for s in message["dropped"]])
        with self._lock:
            self._sessions.pop(round_num, None)  # answered once: never reveal again for this round
            self._globals.pop(round_num, None)
        return shares
