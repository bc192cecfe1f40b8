// The key nginx hashes each request on, so that requests for one adapter land on the replica
// where that adapter is already resident (adapter affinity).
//
// X-Task-Id names the task (and so the adapter) without reading the body. Otherwise the key is
// the JSON body's "model" (an adapter or task name). Requests for the base model, or without a
// readable key, get the request's own id: they need no affinity and spread over the replicas.
//
// The body is read by nginx before the upstream is chosen; it is visible here only when it fits
// in memory (client_body_buffer_size), which the server's 4 MiB body limit guarantees.

function key(r) {
    const task = r.headersIn['X-Task-Id'];
    if (task) {
        return 'task:' + task;
    }
    const body = r.requestText;
    if (body) {
        try {
            const model = JSON.parse(body).model;
            if (typeof model === 'string' && model !== r.variables.loraplex_base_model) {
                return 'model:' + model;
            }
        } catch (e) {
            // Not JSON: the replica answers 400; any replica will do.
        }
    }
    return r.variables.request_id;
}

export default { key };
