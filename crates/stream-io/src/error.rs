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
}
