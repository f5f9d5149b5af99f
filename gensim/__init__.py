"""A faithful GEN API simulator: a real HTTP server on loopback for tests, the demo and benchmarks.

It speaks the lipsync part of GEN's API as GEN documents it: generate on a cell or a
layer under both path prefixes (``/v1/autocontentengine`` and ``/v1/vidsheet``) with both lipsync
bodies, ``GET /v1/generations/{id}``, stop/continue, cells and layers with their ``user_jobs``,
content resources, Idempotency-Key, a public CDN serving real MP4/JPEG bytes, and the agent's
automation config with its event webhook (``PATCH …/automation_config``, ``test_webhook``, a POST on
each status change, late by ``event_delay`` and lost at ``event_loss``). Faults (429, 5xx,
slow, dropped, malformed, truncated and trickled responses, lost submit answers) can be injected
from Python or over HTTP (``/_sim/...``) for out-of-process use. Standard library only.

Usage::

    from gensim import GenSimulator, Fault
    with GenSimulator(api_key="k", durations={"gen": 0.5, "sync_so": 1.0}) as sim:
        sim.add_fault(Fault(endpoint="get_generation", status=503, times=2))
        ...  # point the worker at sim.base_url

or ``python -m gensim --port 8700`` (prints the base URL, serves until SIGINT/SIGTERM).

The seeded world
----------------
* Agent ``"42"`` (configurable with ``agent_ids``); ids may be sent as JSON ints or numeric strings.
* Sheets ``101`` and ``102``. Each has cells ``3000``-``3099``; cell ``C`` has exactly one layer,
  ``C + 1000`` (cell 3000 has layer 4000). Cells start with empty ``additional_attributes``;
  ``PATCH`` merges into them (``lipSyncModel`` is the old body's fallback model).
* Content resources: videos ``5001``-``5099`` and ``"video_res_123"`` (``video/mp4``); audios
  ``6001``-``6099`` and ``"audio_res_456"`` (``audio/mpeg``); each served at
  ``{base_url}/cdn/uploads/{id}.mp4`` / ``.mp3``. Completed outputs are video resources too
  (id ``1_000_000 + generation id``).
* Video ``5099``: generations end ``failed`` with "No face detected in the source video".
  Video ``5098``: generations stay ``pending`` forever. In the new body these apply when the video
  URL's path is that resource's upload path (any host).
* Generations get ids from 9001 upwards (never reused, even across ``reset()``). Each is
  ``pending`` for the first 20% of its model's duration, ``processing`` until the duration, then
  ``completed`` (cost gen 100.0, sync_so 200.0) or ``failed``.

Modules: :mod:`.state` (world, generations, idempotency), :mod:`.events` (the agents' event
webhook), :mod:`.bodies` (the two lipsync bodies),
:mod:`.faults`, :mod:`.stats`, :mod:`.media` (MP4/JPEG/MP3 bytes), :mod:`.server` (HTTP),
:mod:`.runner` (:class:`GenSimulator`, :func:`serve`).
"""

from __future__ import annotations

from gensim.faults import Fault
from gensim.runner import GenSimulator, serve

__all__ = ["Fault", "GenSimulator", "serve"]
