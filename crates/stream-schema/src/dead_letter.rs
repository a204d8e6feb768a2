//! Entries of the dead-letter stream `llm:dead`: a job that no producer could finish (it was
//! claimed `producer.max_attempts` times, or it could not even be decoded), kept with the
//! reason so an operator can inspect it and, if wanted, enqueue it again.

use std::collections::BTreeMap;

use crate::codec::{
    DecodeError, FieldSource, Fields, check_version, optional_parsed, parsed, required,
    version_field,
};
use crate::ids::{EntryId, RequestId};

/// One dead job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Id of the job's entry in `llm:requests` (deleted from there once dead-lettered).
    pub job_entry: EntryId,
    /// The request, when the job could be decoded.
    pub request_id: Option<RequestId>,
    /// Why the job was given up, for humans (`attempts_exhausted: …`, `undecodable: …`).
    pub reason: String,
    /// How many attempts ran (the owner attempt when it was given up); 0 when none could run.
    pub attempts: u32,
    /// The producer (consumer name) that gave it up.
    pub consumer: String,
    /// Unix ms when it was given up.
    pub timestamp: u64,
    /// The job entry's original fields, verbatim, so it can be enqueued again.
    pub job_fields: BTreeMap<String, String>,
}

const F_JOB_ENTRY: &str = "src";
const F_REQUEST: &str = "rid";
const F_REASON: &str = "reason";
const F_ATTEMPTS: &str = "attempts";
const F_CONSUMER: &str = "consumer";
const F_TIMESTAMP: &str = "ts";
/// The original fields as one JSON object (field names of a job are not ours to fix here).
const F_JOB: &str = "job";

impl DeadLetter {
    pub fn encode(&self) -> Fields {
        let mut f = vec![
            version_field(),
            (F_JOB_ENTRY, self.job_entry.to_string()),
            (F_REASON, self.reason.clone()),
            (F_ATTEMPTS, self.attempts.to_string()),
            (F_CONSUMER, self.consumer.clone()),
            (F_TIMESTAMP, self.timestamp.to_string()),
            (
                F_JOB,
                // A map of strings always serializes.
                serde_json::to_string(&self.job_fields).unwrap_or_else(|_| "{}".to_owned()),
            ),
        ];
        if let Some(request_id) = self.request_id {
            f.push((F_REQUEST, request_id.to_string()));
        }
        f
    }

    pub fn decode<S: FieldSource + ?Sized>(src: &S) -> Result<Self, DecodeError> {
        check_version(src)?;
        let job_fields =
            serde_json::from_str(required(src, F_JOB)?).map_err(|e| DecodeError::InvalidField {
                field: F_JOB,
                reason: e.to_string(),
            })?;
        Ok(Self {
            job_entry: parsed(src, F_JOB_ENTRY)?,
            request_id: optional_parsed(src, F_REQUEST)?,
            reason: required(src, F_REASON)?.to_owned(),
            attempts: parsed(src, F_ATTEMPTS)?,
            consumer: required(src, F_CONSUMER)?.to_owned(),
            timestamp: parsed(src, F_TIMESTAMP)?,
            job_fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let mut job_fields = BTreeMap::new();
        job_fields.insert("v".to_owned(), "1".to_owned());
        job_fields.insert("msgs".to_owned(), "{not json".to_owned());
        let dead = DeadLetter {
            job_entry: EntryId::parse("5-1")?,
            request_id: Some(RequestId::new()),
            reason: "attempts_exhausted: 3 attempts".to_owned(),
            attempts: 3,
            consumer: "producer-a".to_owned(),
            timestamp: 9,
            job_fields,
        };
        let owned: Vec<(String, String)> = dead
            .encode()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(DeadLetter::decode(&owned)?, dead);

        let anonymous = DeadLetter {
            request_id: None,
            ..dead
        };
        let owned: Vec<(String, String)> = anonymous
            .encode()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(DeadLetter::decode(&owned)?, anonymous);
        Ok(())
    }
}
