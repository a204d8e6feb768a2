//! Fault and shape directives a request can carry: `[[mock key=value …]]` in any message, or
//! `mock:key=value,…` in the model name.
//!
//! Grammar (whitespace separates pairs inside `[[mock …]]`, commas in the model name):
//!
//! ```text
//! directive  = "[[mock" ( ws pair )* ws? "]]"
//! model      = name ":" pair ( "," pair )*
//! pair       = key "=" value            ; values are unsigned decimal integers
//! key        = tokens | delay_ms | seed | status | fail_times | retry_after
//!            | error_after | disconnect_after | stall_after | no_usage | stamp
//!            | tools | reasoning | arg_chunk
//! ```
//!
//! `tools=N` answers with N tool calls (their argument fragments `arg_chunk=` characters long,
//! default 3) and no text unless `tokens=` asks for some; `reasoning=N` streams N reasoning
//! chunks before the answer (see [`crate::scenario`]). The in-stream faults count every
//! content chunk (reasoning, text, a tool call's opening and each argument fragment).
//!
//! `[[mock` only opens a directive when followed by whitespace or `]]`; without a closing `]]`
//! it is ordinary text. The model name's pairs apply first, then message directives in message
//! order; a later value for the same key wins. An unknown key or a bad value is a `400`, so a
//! typo never silently turns into a different test.

/// Opening of a directive inside message content.
const OPEN: &str = "[[mock";
/// End of a directive.
const CLOSE: &str = "]]";

/// Everything a request asked of the mock, beyond the OpenAI parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    /// Completion length before `max_tokens` applies; default `MockLlmSettings::default_tokens`.
    pub tokens: Option<usize>,
    /// Delay before each token; default `MockLlmSettings::token_delay_ms`.
    pub delay_ms: Option<u64>,
    /// Replaces (is not mixed with) `MockLlmSettings::seed`.
    pub seed: Option<u64>,
    /// Fail before the first token with this HTTP status.
    pub status: Option<u16>,
    /// Only the first N requests with the same faults and prompt fail; later ones succeed.
    pub fail_times: Option<u32>,
    /// `Retry-After` seconds on a `status` failure (429 gets 1 unless set).
    pub retry_after: Option<u64>,
    /// After N tokens, an in-stream `{"error":…}` event and the end, without `[DONE]`.
    pub error_after: Option<usize>,
    /// After N tokens, an abrupt connection abort.
    pub disconnect_after: Option<usize>,
    /// After N tokens, silence with the connection left open.
    pub stall_after: Option<usize>,
    /// Never send usage, even when `stream_options.include_usage` asks for it.
    pub no_usage: bool,
    /// Answer with this many tool calls (see [`crate::scenario`]).
    pub tools: Option<usize>,
    /// Stream this many reasoning chunks before the answer.
    pub reasoning: Option<usize>,
    /// Characters per tool-call argument fragment (at least 1).
    pub arg_chunk: Option<usize>,
    /// Append `|<send time, Unix µs>` to each streamed token's content. Benchmarks use it to
    /// time tokens through any path that forwards content unchanged (the bridge, a proxy).
    pub stamp: bool,
}

/// A directive that cannot be understood; answered with `400`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    #[error("mock directive `{0}` is not key=value")]
    MissingValue(String),
    #[error("unknown mock directive key `{0}`")]
    UnknownKey(String),
    #[error("mock directive `{key}` has invalid value `{value}`")]
    BadValue { key: String, value: String },
}

/// The in-stream fault that fires first, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidStreamFault {
    Error,
    Disconnect,
    Stall,
}

impl Directives {
    /// Sets one `key=value` pair.
    pub fn apply_pair(&mut self, pair: &str) -> Result<(), DirectiveError> {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| DirectiveError::MissingValue(pair.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        let bad = || DirectiveError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        let int = || value.parse::<u64>().map_err(|_| bad());
        let size = || value.parse::<usize>().map_err(|_| bad());
        match key {
            "tokens" => self.tokens = Some(size()?),
            "delay_ms" => self.delay_ms = Some(int()?),
            "seed" => self.seed = Some(int()?),
            "status" => {
                let status = value.parse::<u16>().map_err(|_| bad())?;
                // Only real error statuses: a 2xx or 1xx "failure" would not be one.
                if !(400..=599).contains(&status) {
                    return Err(bad());
                }
                self.status = Some(status);
            }
            "fail_times" => self.fail_times = Some(value.parse::<u32>().map_err(|_| bad())?),
            "retry_after" => self.retry_after = Some(int()?),
            "error_after" => self.error_after = Some(size()?),
            "disconnect_after" => self.disconnect_after = Some(size()?),
            "stall_after" => self.stall_after = Some(size()?),
            "tools" => self.tools = Some(size()?),
            "reasoning" => self.reasoning = Some(size()?),
            "arg_chunk" => {
                let chars = size()?;
                if chars == 0 {
                    return Err(bad());
                }
                self.arg_chunk = Some(chars);
            }
            "no_usage" | "stamp" => {
                let flag = match value {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(bad()),
                };
                if key == "stamp" {
                    self.stamp = flag;
                } else {
                    self.no_usage = flag;
                }
            }
            _ => return Err(DirectiveError::UnknownKey(key.to_owned())),
        }
        Ok(())
    }

    /// Applies the pairs after the first `:` of a model name (`mock:tokens=5,delay_ms=0`).
    pub fn apply_model(&mut self, model: &str) -> Result<(), DirectiveError> {
        let Some((_, pairs)) = model.split_once(':') else {
            return Ok(());
        };
        for pair in pairs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            self.apply_pair(pair)?;
        }
        Ok(())
    }

    /// Applies every directive found in one message's content.
    pub fn apply_content(&mut self, content: &str) -> Result<(), DirectiveError> {
        for body in split(content).1 {
            for pair in body.split_whitespace() {
                self.apply_pair(pair)?;
            }
        }
        Ok(())
    }

    /// Whether any fault is requested (these are what `fail_times` counts).
    pub fn has_fault(&self) -> bool {
        self.status.is_some()
            || self.error_after.is_some()
            || self.disconnect_after.is_some()
            || self.stall_after.is_some()
    }

    /// A stable description of the fault part, for keying `fail_times` counters.
    pub fn fault_key(&self) -> String {
        format!(
            "status={:?} error_after={:?} disconnect_after={:?} stall_after={:?} fail_times={:?}",
            self.status, self.error_after, self.disconnect_after, self.stall_after, self.fail_times
        )
    }

    /// The in-stream fault with the smallest token count; ties go error, disconnect, stall.
    pub fn mid_stream_fault(&self) -> Option<(usize, MidStreamFault)> {
        [
            (self.error_after, MidStreamFault::Error),
            (self.disconnect_after, MidStreamFault::Disconnect),
            (self.stall_after, MidStreamFault::Stall),
        ]
        .into_iter()
        .filter_map(|(at, fault)| at.map(|at| (at, fault)))
        .min_by_key(|(at, _)| *at)
    }
}

/// Splits content into the text with every directive removed and the directive bodies
/// (what lies between `[[mock` and `]]`).
pub fn split(content: &str) -> (String, Vec<&str>) {
    let mut text = String::with_capacity(content.len());
    let mut bodies = Vec::new();
    let mut rest = content;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        // `[[mockingbird` is text, not a directive.
        let opens = after.starts_with(CLOSE) || after.starts_with(char::is_whitespace);
        match (opens, after.find(CLOSE)) {
            (true, Some(end)) => {
                text.push_str(&rest[..start]);
                bodies.push(&after[..end]);
                rest = &after[end + CLOSE.len()..];
            }
            _ => {
                text.push_str(&rest[..start + OPEN.len()]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    (text, bodies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_removed_from_text() {
        let (text, bodies) = split("Tell me [[mock tokens=5 seed=2]] a story[[mock]]");
        assert_eq!(text, "Tell me  a story");
        assert_eq!(bodies, vec![" tokens=5 seed=2", ""]);
    }

    #[test]
    fn lookalikes_and_unterminated_openers_stay_text() {
        assert_eq!(split("[[mockingbird]]").0, "[[mockingbird]]");
        assert_eq!(split("a [[mock tokens=1").0, "a [[mock tokens=1");
    }

    #[test]
    fn model_then_content_later_wins() -> Result<(), DirectiveError> {
        let mut d = Directives::default();
        d.apply_model("mock:tokens=5,delay_ms=0")?;
        d.apply_content("[[mock tokens=7 no_usage=1 stamp=1 tools=2 reasoning=3 arg_chunk=5]]")?;
        assert_eq!(d.tokens, Some(7));
        assert_eq!(
            (d.tools, d.reasoning, d.arg_chunk),
            (Some(2), Some(3), Some(5))
        );
        assert_eq!(d.delay_ms, Some(0));
        assert!(d.no_usage);
        assert!(d.stamp);
        Ok(())
    }

    #[test]
    fn typos_are_errors() {
        let mut d = Directives::default();
        assert!(matches!(
            d.apply_content("[[mock tokenz=5]]"),
            Err(DirectiveError::UnknownKey(_))
        ));
        assert!(matches!(
            d.apply_model("mock:status=200"),
            Err(DirectiveError::BadValue { .. })
        ));
        assert!(matches!(
            d.apply_content("[[mock arg_chunk=0]]"),
            Err(DirectiveError::BadValue { .. })
        ));
        assert!(matches!(
            d.apply_content("[[mock tokens]]"),
            Err(DirectiveError::MissingValue(_))
        ));
    }

    #[test]
    fn earliest_mid_stream_fault_wins() {
        let d = Directives {
            stall_after: Some(2),
            disconnect_after: Some(5),
            ..Directives::default()
        };
        assert_eq!(d.mid_stream_fault(), Some((2, MidStreamFault::Stall)));
    }
}
