#!/usr/bin/env node
// Enqueue one lipsync job (Celery task `lipsync.run`) from Node.js with celery-node, wait for it,
// print the result JSON on stdout.
//
//   BROKER_URL=redis://redis:6379/0 RESULT_BACKEND=redis://redis:6379/1 node enqueue.js [REQUEST]
//
// REQUEST is a request JSON string or the path of a JSON file (default: a demo request).
// RESULT_TIMEOUT is how long to wait, in seconds (default 1800, the worker's default job timeout).
// Exit codes: 0 completed; 1 the job failed (its failure JSON is on stdout); 2 bad usage;
// 3 no result in time, or Redis unreachable.
// See README.md beside this file for the celery-node quirks handled here.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const celery = require("celery-node");

const TASK = "lipsync.run";
// celery-node sends every task of a client to one queue, "celery" unless told otherwise; the
// worker consumes "lipsync" (plus its internal queues), so a job sent to "celery" would wait forever.
const QUEUE = "lipsync";

const DEMO_REQUEST = {
  sheet_id: 101,
  cell_id: 3000,
  layer_id: 4000,
  video_resource_id: 5001,
  audio_resource_id: 6001,
  model: "sync_so",
  metadata: { sent_by: "examples/node" },
};

function readRequest(arg) {
  if (arg === undefined) return { ...DEMO_REQUEST };
  const text = /^\s*[[{]/.test(arg) ? arg : fs.readFileSync(arg, "utf8");
  const request = JSON.parse(text);
  if (request === null || typeof request !== "object" || Array.isArray(request)) {
    throw new Error("the request must be a JSON object");
  }
  return request;
}

// Print, close the Redis connections (ioredis keeps the process alive otherwise), and exit. A
// connection that never came up may not close cleanly, so closing is given one second at most.
async function finish(client, code, stdout, stderr) {
  if (stdout !== undefined) process.stdout.write(`${JSON.stringify(stdout)}\n`);
  if (stderr) process.stderr.write(`${stderr}\n`);
  const grace = new Promise((resolve) => setTimeout(resolve, 1000).unref());
  await Promise.race([client.disconnect().catch(() => {}), grace]);
  process.exit(code);
}

async function main() {
  const brokerUrl = process.env.BROKER_URL;
  const backendUrl = process.env.RESULT_BACKEND;
  const timeoutSeconds = Number(process.env.RESULT_TIMEOUT || 1800);
  if (!brokerUrl || !backendUrl || !(timeoutSeconds > 0)) {
    process.stderr.write("set BROKER_URL and RESULT_BACKEND (redis://...); RESULT_TIMEOUT > 0\n");
    process.exit(2);
  }
  let request;
  try {
    request = readRequest(process.argv[2]);
  } catch (err) {
    process.stderr.write(`bad request: ${err.message}\n`);
    process.exit(2);
  }
  // Like the Python helper (worker.enqueue): the job id doubles as the Celery task id, so the
  // result key, `AsyncResult(job_id)` and `lipsync-worker status JOB_ID` all find the job.
  // Validation is left to the worker: a bad request fails the task with a `validation_error`.
  if (request.job_id === undefined) request.job_id = crypto.randomUUID();
  const taskId = String(request.job_id);

  const client = celery.createClient(brokerUrl, backendUrl, QUEUE);
  // client.sendTask() publishes inside a promise it does not return (dist/app/client.js), and
  // AsyncResult.get() polls without a catch (dist/app/result.js): a Redis error in either would
  // surface only as an unhandled rejection. Report it and exit instead of dying with a stack trace.
  process.on("unhandledRejection", (err) => {
    finish(client, 3, undefined, `redis error: ${err && err.message ? err.message : err}`);
  });
  try {
    // Fail fast on a wrong URL instead of waiting out the whole timeout.
    await client.isReady();
  } catch (err) {
    return finish(client, 3, undefined, `cannot reach Redis: ${err.message}`);
  }

  // The task takes only the keyword `request`. Task#delay(...args) cannot send kwargs
  // (dist/app/task.js: `delay(...args) { return this.applyAsync([...args]); }`), so call
  // sendTask with explicit empty positional args, the kwargs, and our task id.
  const result = client.sendTask(TASK, [], { request }, taskId);
  process.stderr.write(`enqueued ${TASK} ${taskId} on queue ${QUEUE}; waiting up to ${timeoutSeconds} s\n`);

  try {
    // celery-node reads the Celery Redis backend's key `celery-task-meta-<id>` itself (JSON), and
    // resolves only on SUCCESS; FAILURE / REVOKED / its own TIMEOUT reject with Error(status).
    const value = await result.get(timeoutSeconds * 1000);
    return finish(client, 0, value);
  } catch (err) {
    if (err.message === "TIMEOUT") {
      return finish(client, 3, undefined, `no result after ${timeoutSeconds} s (job ${taskId} may still run)`);
    }
    // On FAILURE celery-node copies the stored result onto the error: `exc_type`, and
    // `exc_message`, whose first element is this worker's failure JSON (LipsyncJobFailed(failure)).
    const failure =
      Array.isArray(err.exc_message) && err.exc_message[0] && typeof err.exc_message[0] === "object"
        ? err.exc_message[0]
        : { status: err.message, exc_type: err.exc_type, exc_message: err.exc_message };
    const summary = `job ${taskId} ${failure.status}: ${failure.error_code || failure.exc_type || ""} ${failure.message || ""}`;
    return finish(client, 1, failure, summary.trim());
  }
}

main();
