//! What the script tests share: a token event, and a started request.

use fred::prelude::*;
use stream_io::session::{RequestStreams, Retention, SessionScripts};
use stream_schema::{ModelId, RequestId, SessionEvent, SessionId};

pub fn token(request_id: RequestId, sequence: u64) -> SessionEvent {
    SessionEvent::Token {
        request_id,
        sequence,
        content: format!("t{sequence}"),
        timestamp: 1,
    }
}

/// Starts `request_id` on `model` of `session` (attempt 1, entries kept 60 s) and returns its
/// streams.
pub async fn start_request(
    client: &Client,
    scripts: &SessionScripts,
    session: &SessionId,
    model: &ModelId,
    request_id: RequestId,
) -> anyhow::Result<RequestStreams> {
    let streams = RequestStreams::new(session, model, &request_id, Retention { ttl_secs: 60 });
    let start = SessionEvent::Start {
        request_id,
        session_id: session.clone(),
        model_id: model.clone(),
        attempt: 1,
        timestamp: 1,
    };
    scripts
        .start(
            client,
            &streams.stream,
            &streams.owner,
            &start,
            streams.retention,
        )
        .await?;
    Ok(streams)
}
