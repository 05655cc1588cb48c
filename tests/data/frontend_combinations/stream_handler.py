"""A plain TorchServe handler (not ts_plugin's) that streams like a continuous-batching handler.

A request body {"name": "a", "pieces": 3} is answered in 3 pieces "a0 ", "a1 ", "a2 ", one per `handle`
call, as base_neuronx_continuous_batching_handler.py does: the per-request state lives in the worker,
keyed by request id, and `context.stopping_criteria` tells TorchServe's create_predict_response to set
the response header ts_stream_next to "true" until the last piece ("false" on it). A request the
frontend re-sends while it runs ("cached in backend") comes without a body: the handler continues it.

Every call appends two JSON lines to the file named by handler.events in model-config.yaml, so that a test
can see what the frontend sent: {"t", "begin": [names]} when it starts and, when it ends, the time, the
worker pid and per row the request id and name, whether it came with a body, the sequence id/start
headers and the piece answered. handler.step_s is the time of one call (the "decode step").
"""
import asyncio
import json
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

_STATE = {}  # request id -> {"name": str, "pieces": int, "sent": int}
_LOCK = threading.Lock()
SEQUENCE_ID = "ts_request_sequence_id"
SEQUENCE_START = "ts_request_sequence_start"


def _config(context):
    return (context.model_yaml_config or {}).get("handler") or {}


def _step(data, context):
    """One step: a piece for every row; returns (pieces, per-row stop flags, event)."""
    rows, pieces, stops = [], [], []
    with _LOCK:
        for idx, row in enumerate(data):
            req_id = context.get_request_id(idx)
            body = row.get("data") if row.get("data") is not None else row.get("body")
            has_body = bool(row)
            if isinstance(body, (bytes, bytearray)):
                body = body.decode("utf-8")
            if isinstance(body, str):
                body = json.loads(body)
            fresh = has_body and req_id not in _STATE
            if has_body and req_id in _STATE:
                state = _STATE[req_id]  # the same request sent again with its body
            elif has_body:
                state = _STATE[req_id] = {"name": body["name"], "pieces": int(body["pieces"]), "sent": 0}
            else:
                state = _STATE.get(req_id)
            if state is None:  # a body-less request we never saw
                piece, stop = "?", True
            else:
                piece = f"{state['name']}{state['sent']} "
                state["sent"] += 1
                stop = state["sent"] >= state["pieces"]
                if stop:
                    del _STATE[req_id]
            pieces.append(piece)
            stops.append(stop)
            rows.append({"id": req_id, "name": state["name"] if state else None, "body": has_body, "fresh": fresh,
                         "piece": piece, "stop": stop,
                         "seq": context.get_request_header(idx, SEQUENCE_ID),
                         "seq_start": context.get_request_header(idx, SEQUENCE_START)})
    event = {"t": time.time(), "pid": os.getpid(), "model": context.model_name, "rows": rows}
    _write(context, {"t": event["t"], "begin": [row["name"] for row in rows]})  # the call started
    return pieces, stops, event


def _write(context, record):
    path = _config(context).get("events")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def _finish(pieces, stops, event, context):
    # read by ts.protocol.otf_message_handler.create_predict_response: True -> ts_stream_next "false"
    context.stopping_criteria = [lambda _res, stop=stop: stop for stop in stops]
    event["t_end"] = time.time()
    _write(context, event)
    logger.info("stream_handler call: %s", json.dumps(event["rows"]))
    return pieces


def handle(data, context):
    if data is None:  # initialize: the function entry point is called once with no data
        return None
    if (context.model_yaml_config or {}).get("asyncCommunication"):
        return _handle_async(data, context)  # the async worker awaits what the entry point returns
    pieces, stops, event = _step(data, context)
    time.sleep(float(_config(context).get("step_s", 0.2)))
    return _finish(pieces, stops, event, context)


async def _handle_async(data, context):
    pieces, stops, event = _step(data, context)
    await asyncio.sleep(float(_config(context).get("step_s", 0.2)))
    return _finish(pieces, stops, event, context)
