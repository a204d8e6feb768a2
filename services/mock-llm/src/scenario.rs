//! The answer a request gets, planned once and independent of any wire format: reasoning
//! chunks, text chunks, tool calls with their argument fragments, the finish reason and the
//! usage ([`Scenario`]); and how it is delivered: the per-chunk delay, `stamp`, and the
//! in-stream fault ([`Plan`], played back by [`Playback`]).
//!
//! A wire encoder (OpenAI chunks in `openai`) only turns [`Piece`]s into frames and adds its
//! format's opening and closing frames; what is said, in which order, and when a fault fires
//! is decided here, so every format tells the same answer.
//!
//! Like [`crate::text`], this is a contract with other crates' tests: [`Scenario::plan`] is
//! deterministic in its inputs, so a test computes the exact tool calls and reasoning a stream
//! must carry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::directive::MidStreamFault;
use crate::text;

/// Characters per tool-call argument fragment unless `arg_chunk=` says otherwise: small, so
/// the arguments of every call arrive in many chunks.
pub const DEFAULT_ARG_CHUNK: usize = 3;

/// Tool names used when the request declares no tools.
const DEFAULT_TOOL_NAMES: &[&str] = &["get_weather", "search_docs", "lookup_order"];

/// Why the answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    /// `max_tokens` cut the text short.
    Length,
    /// The answer asks for tool calls.
    ToolCalls,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// One tool call of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The whole arguments JSON: the concatenation of `fragments`.
    pub arguments: String,
    /// How the arguments are streamed, in order.
    pub fragments: Vec<String>,
}

/// What to plan: the shape of the answer, from the directives and the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Answer text chunks (words).
    pub text_tokens: usize,
    /// Whether `text_tokens` was cut by `max_tokens` (the finish is then `length`).
    pub truncated: bool,
    /// Reasoning chunks, streamed before the text.
    pub reasoning: usize,
    /// Tool calls, streamed after the text.
    pub tool_calls: usize,
    /// Names for the calls, used in turn; empty uses built-in names.
    pub tool_names: Vec<String>,
    /// Characters per argument fragment (at least 1).
    pub arg_chunk: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            text_tokens: 0,
            truncated: false,
            reasoning: 0,
            tool_calls: 0,
            tool_names: Vec::new(),
            arg_chunk: DEFAULT_ARG_CHUNK,
        }
    }
}

/// Token counts of an answer, in the mock's own measure: every chunk it streams is one
/// completion token (reasoning, text, and each tool-call chunk), so the usage it reports
/// equals what a client counting chunks gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub reasoning_tokens: u32,
}

/// A whole answer, before any wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub reasoning: Vec<String>,
    pub text: Vec<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
    pub prompt_tokens: u32,
}

/// One content chunk of an answer, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Reasoning(&'a str),
    Text(&'a str),
    /// The opening of tool call `index`: its id and name, no arguments yet.
    ToolCallStart {
        index: usize,
        id: &'a str,
        name: &'a str,
    },
    /// A fragment of tool call `index`'s arguments.
    ToolCallArguments {
        index: usize,
        fragment: &'a str,
    },
}

impl Scenario {
    /// The deterministic answer to `prompt` (see [`text::prompt_text`]) with `seed`: text as
    /// [`text::completion_tokens`], reasoning and tool-call arguments from the same generator
    /// with derived seeds, call ids from the prompt and seed.
    pub fn plan(prompt: &str, seed: u64, shape: &Shape) -> Self {
        let tool_calls = (0..shape.tool_calls)
            .map(|index| tool_call(prompt, seed, index, shape))
            .collect::<Vec<_>>();
        let finish = if !tool_calls.is_empty() {
            Finish::ToolCalls
        } else if shape.truncated {
            Finish::Length
        } else {
            Finish::Stop
        };
        Self {
            reasoning: reasoning_chunks(prompt, seed, shape.reasoning),
            text: text::completion_tokens(prompt, seed, shape.text_tokens),
            tool_calls,
            finish,
            prompt_tokens: text::count_prompt_tokens(prompt),
        }
    }

    /// Every content chunk in stream order: reasoning, text, then each tool call (its start,
    /// then its argument fragments).
    pub fn pieces(&self) -> Vec<Piece<'_>> {
        (0..self.chunk_count())
            .filter_map(|i| self.piece(i))
            .collect()
    }

    /// Chunk `index` of [`Scenario::pieces`], without building the list.
    pub fn piece(&self, index: usize) -> Option<Piece<'_>> {
        if let Some(reasoning) = self.reasoning.get(index) {
            return Some(Piece::Reasoning(reasoning));
        }
        let mut rest = index - self.reasoning.len();
        if let Some(text) = self.text.get(rest) {
            return Some(Piece::Text(text));
        }
        rest -= self.text.len();
        for (call_index, call) in self.tool_calls.iter().enumerate() {
            if rest == 0 {
                return Some(Piece::ToolCallStart {
                    index: call_index,
                    id: &call.id,
                    name: &call.name,
                });
            }
            if let Some(fragment) = call.fragments.get(rest - 1) {
                return Some(Piece::ToolCallArguments {
                    index: call_index,
                    fragment,
                });
            }
            rest -= 1 + call.fragments.len();
        }
        None
    }

    /// How many chunks the answer streams.
    pub fn chunk_count(&self) -> usize {
        self.reasoning.len()
            + self.text.len()
            + self
                .tool_calls
                .iter()
                .map(|c| 1 + c.fragments.len())
                .sum::<usize>()
    }

    pub fn usage(&self) -> Usage {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: count(self.chunk_count()),
            reasoning_tokens: count(self.reasoning.len()),
        }
    }
}

/// Reasoning chunks: words of the same generator under another seed, so they differ from the
/// answer text.
fn reasoning_chunks(prompt: &str, seed: u64, count: usize) -> Vec<String> {
    text::completion_tokens(prompt, seed ^ 0x5eed_0000_7e45_0000, count)
}

/// The arguments object of a call, in a fixed field order. `note` holds characters that break
/// a client that does not rebuild arguments byte for byte: a quote, an escape, non-ASCII.
#[derive(Serialize)]
struct Arguments<'a> {
    query: &'a str,
    call: usize,
    note: &'a str,
}

fn tool_call(prompt: &str, seed: u64, index: usize, shape: &Shape) -> ToolCall {
    let words = text::completion_tokens(prompt, seed ^ (0xca11_0000 + index as u64), 6).concat();
    let arguments = serde_json::to_string(&Arguments {
        query: words.trim(),
        call: index,
        note: "naïve \"quoted\" ✓",
    })
    // A struct of strings and an integer always serializes.
    .unwrap_or_else(|_| "{}".to_owned());
    let name = if shape.tool_names.is_empty() {
        DEFAULT_TOOL_NAMES[index % DEFAULT_TOOL_NAMES.len()].to_owned()
    } else {
        shape.tool_names[index % shape.tool_names.len()].clone()
    };
    let tag = text::fnv1a(prompt.as_bytes()) ^ seed;
    ToolCall {
        id: format!("call_{:012x}{index}", tag & 0xffff_ffff_ffff),
        name,
        fragments: fragments(&arguments, shape.arg_chunk.max(1)),
        arguments,
    }
}

/// `text` in pieces of `chars` characters (never splitting a character).
fn fragments(text: &str, chars: usize) -> Vec<String> {
    let all: Vec<char> = text.chars().collect();
    all.chunks(chars).map(|c| c.iter().collect()).collect()
}

/// A scenario and how it is delivered.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    /// Before each chunk.
    pub delay: Duration,
    /// `stamp=1`: each text chunk ends with `|<send time, Unix µs>`.
    pub stamp: bool,
    /// The in-stream fault and the number of chunks sent before it, when one fires.
    pub fault: Option<(usize, MidStreamFault)>,
}

/// What comes next in a played-back answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Played<'a> {
    /// Send this chunk. `text` is the chunk's text as sent (stamped when asked).
    Piece { piece: Piece<'a>, sent_at_us: u64 },
    /// The fault fires now, instead of the rest of the answer.
    Fault(MidStreamFault),
    /// Every chunk was sent: close the answer (finish, usage, end marker).
    End,
}

/// Walks a plan's chunks in order, sleeping the delay before each, and stops at its fault.
pub struct Playback {
    pub plan: Plan,
    next: usize,
    /// Stamped copies of text chunks live here so pieces can borrow them.
    stamped: Option<String>,
}

impl Playback {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            next: 0,
            stamped: None,
        }
    }

    /// The next step. After [`Played::Fault`] or [`Played::End`] it keeps returning the same.
    pub async fn next(&mut self) -> Played<'_> {
        let total = self.plan.scenario.chunk_count();
        // A fault past the end fires after the last chunk, so it always fires.
        if let Some((at, fault)) = self.plan.fault
            && self.next >= at.min(total)
        {
            return Played::Fault(fault);
        }
        if self.next >= total {
            return Played::End;
        }
        if !self.plan.delay.is_zero() {
            tokio::time::sleep(self.plan.delay).await;
        }
        let index = self.next;
        self.next += 1;
        let sent_at_us = unix_micros();
        let piece = self.plan.scenario.piece(index).unwrap_or(Piece::Text(""));
        match piece {
            Piece::Text(text) if self.plan.stamp => {
                self.stamped = Some(format!("{text}|{sent_at_us}"));
                Played::Piece {
                    piece: Piece::Text(self.stamped.as_deref().unwrap_or_default()),
                    sent_at_us,
                }
            }
            piece => Played::Piece { piece, sent_at_us },
        }
    }
}

fn unix_micros() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tool_calls: usize, reasoning: usize) -> Shape {
        Shape {
            text_tokens: 2,
            reasoning,
            tool_calls,
            ..Shape::default()
        }
    }

    #[test]
    fn tool_calls_are_deterministic_and_their_fragments_rebuild_the_arguments() {
        let a = Scenario::plan("weather in Paris", 0, &shape(2, 0));
        let b = Scenario::plan("weather in Paris", 0, &shape(2, 0));
        assert_eq!(a, b);
        assert_eq!(a.finish, Finish::ToolCalls);
        assert_eq!(a.tool_calls.len(), 2);
        assert_ne!(a.tool_calls[0].id, a.tool_calls[1].id);
        for call in &a.tool_calls {
            assert!(call.fragments.len() > 10, "{call:?}");
            assert_eq!(call.fragments.concat(), call.arguments);
            let parsed: serde_json::Value =
                serde_json::from_str(&call.arguments).unwrap_or_default();
            assert_eq!(parsed["note"], "naïve \"quoted\" ✓");
        }
        assert_eq!(a.tool_calls[0].name, "get_weather");
        let other = Scenario::plan("weather in Rome", 0, &shape(2, 0));
        assert_ne!(other.tool_calls[0].arguments, a.tool_calls[0].arguments);
    }

    #[test]
    fn pieces_come_reasoning_text_then_each_call() {
        let scenario = Scenario::plan("p", 1, &shape(1, 2));
        let pieces = scenario.pieces();
        assert!(matches!(pieces[0], Piece::Reasoning(_)));
        assert!(matches!(pieces[1], Piece::Reasoning(_)));
        assert!(matches!(pieces[2], Piece::Text(_)));
        assert!(matches!(pieces[3], Piece::Text(_)));
        assert!(matches!(pieces[4], Piece::ToolCallStart { index: 0, .. }));
        assert!(
            pieces[5..]
                .iter()
                .all(|p| matches!(p, Piece::ToolCallArguments { index: 0, .. }))
        );
        let usage = scenario.usage();
        assert_eq!(usage.completion_tokens as usize, pieces.len());
        assert_eq!(usage.reasoning_tokens, 2);
    }

    #[test]
    fn request_tool_names_are_used_in_turn() {
        let shape = Shape {
            tool_calls: 3,
            tool_names: vec!["a".to_owned(), "b".to_owned()],
            ..Shape::default()
        };
        let names: Vec<String> = Scenario::plan("p", 0, &shape)
            .tool_calls
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["a", "b", "a"]);
    }

    #[tokio::test]
    async fn playback_stops_at_the_fault() {
        let plan = Plan {
            scenario: Scenario::plan("p", 0, &shape(1, 1)),
            delay: Duration::ZERO,
            stamp: false,
            fault: Some((2, MidStreamFault::Error)),
        };
        let mut playback = Playback::new(plan);
        assert!(matches!(
            playback.next().await,
            Played::Piece {
                piece: Piece::Reasoning(_),
                ..
            }
        ));
        assert!(matches!(
            playback.next().await,
            Played::Piece {
                piece: Piece::Text(_),
                ..
            }
        ));
        assert_eq!(playback.next().await, Played::Fault(MidStreamFault::Error));
    }
}
