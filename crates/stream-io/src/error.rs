//! Errors of the stream IO layer.

/// A Redis call failed or answered something this layer cannot read.
#[derive(Debug, thiserror::Error)]
pub enum StreamIoError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
}

impl StreamIoError {
    /// True when the failure is Redis being unreachable or slow (callers answer 503), not a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Redis(error) => {
                use fred::error::ErrorKind;
                matches!(
                    error.kind(),
                    ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Unknown
                ) || error.details().contains("connection")
            }
            Self::Protocol(_) => false,
        }
    }

    /// True when a group command found no group (`NOGROUP`): the stream or its group is gone,
    /// typically because Redis came back empty (restarted without persistence, or a failover
    /// to a replica that had not received them). The caller recreates the group.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, Self::Redis(error) if error.details().contains("NOGROUP"))
    }
}
