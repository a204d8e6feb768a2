//! What a client was sent of one request's answer, and whether the attempt after a producer
//! failover (`restart`) reproduces it. Shared by the dialects whose clients cannot drop text
//! they have shown (OpenAI chunks, AI SDK UI message parts): the new attempt's output is
//! suppressed while it repeats the sent prefix and continues after it; when it contradicts what
//! was sent (other text, another tool call id or name, or an answer that ends shorter), the
//! dialect ends its stream with an error instead.

use std::collections::BTreeMap;

/// What the client was sent of one tool call.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SentCall {
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// The new attempt's output is not what the client already has.
#[derive(Debug)]
pub(crate) struct Diverged;

/// The part of a tool call fragment the client does not have yet.
#[derive(Debug, PartialEq)]
pub(crate) struct CallFragment {
    /// The client never saw this call: the fragment opens it (with the event's id and name).
    pub first: bool,
    /// The arguments text to send (all of it when `first`).
    pub arguments: String,
}

/// How much of what was sent the current attempt has produced so far (bytes per kind). In the
/// first attempt these equal the sent lengths; after a `restart` they start again from zero.
#[derive(Debug, Clone, Default)]
struct Reproduced {
    content: usize,
    reasoning: usize,
    calls: BTreeMap<u32, usize>,
}

/// Everything the client was sent, as it accumulates it, and how much of it the current
/// attempt reproduced.
#[derive(Debug, Default)]
pub(crate) struct SentPrefix {
    content: String,
    reasoning: String,
    calls: BTreeMap<u32, SentCall>,
    reproduced: Reproduced,
}

/// Takes the attempt's next `fragment` of one kind: what of it to send (the part after what the
/// client has), or `Diverged` when it contradicts what was sent.
fn advance(sent: &mut String, reproduced: &mut usize, fragment: &str) -> Result<String, Diverged> {
    let start = *reproduced;
    *reproduced = start.saturating_add(fragment.len());
    let have = sent.len();
    let overlap = have.saturating_sub(start).min(fragment.len());
    let expected = sent
        .as_bytes()
        .get(start..start + overlap)
        .ok_or(Diverged)?;
    if expected != fragment.as_bytes().get(..overlap).ok_or(Diverged)? {
        return Err(Diverged);
    }
    let rest = fragment.get(overlap..).ok_or(Diverged)?;
    sent.push_str(rest);
    Ok(rest.to_owned())
}

/// `true` when both are known and differ.
fn contradicts(sent: Option<&String>, new: Option<&String>) -> bool {
    matches!((sent, new), (Some(a), Some(b)) if a != b)
}

impl SentPrefix {
    /// A new attempt starts: its output is compared with what was sent from the beginning.
    pub fn restart(&mut self) {
        self.reproduced = Reproduced::default();
    }

    /// A text fragment: the part to send (empty while the attempt repeats the sent prefix).
    pub fn text(&mut self, fragment: &str) -> Result<String, Diverged> {
        advance(&mut self.content, &mut self.reproduced.content, fragment)
    }

    /// A reasoning fragment, as [`SentPrefix::text`].
    pub fn reasoning(&mut self, fragment: &str) -> Result<String, Diverged> {
        advance(
            &mut self.reasoning,
            &mut self.reproduced.reasoning,
            fragment,
        )
    }

    /// A tool call fragment: what to send of it, if anything.
    pub fn tool_call(
        &mut self,
        index: u32,
        id: Option<&String>,
        name: Option<&String>,
        arguments: &str,
    ) -> Result<Option<CallFragment>, Diverged> {
        let reproduced = self.reproduced.calls.entry(index).or_default();
        match self.calls.get_mut(&index) {
            None => {
                *reproduced = arguments.len();
                self.calls.insert(
                    index,
                    SentCall {
                        id: id.cloned(),
                        name: name.cloned(),
                        arguments: arguments.to_owned(),
                    },
                );
                Ok(Some(CallFragment {
                    first: true,
                    arguments: arguments.to_owned(),
                }))
            }
            Some(sent) => {
                if contradicts(sent.id.as_ref(), id) || contradicts(sent.name.as_ref(), name) {
                    return Err(Diverged);
                }
                let rest = advance(&mut sent.arguments, reproduced, arguments)?;
                Ok((!rest.is_empty()).then_some(CallFragment {
                    first: false,
                    arguments: rest,
                }))
            }
        }
    }

    /// At the end: the finished attempt must have reproduced everything that was sent.
    pub fn check_complete(&self) -> Result<(), Diverged> {
        let calls_done = self.calls.iter().all(|(index, call)| {
            self.reproduced.calls.get(index).copied() == Some(call.arguments.len())
        });
        if self.reproduced.content == self.content.len()
            && self.reproduced.reasoning == self.reasoning.len()
            && calls_done
        {
            Ok(())
        } else {
            Err(Diverged)
        }
    }

    pub fn content(&self) -> &str {
        &self.content
    }

    pub fn reasoning_text(&self) -> &str {
        &self.reasoning
    }

    /// The tool calls sent, by index.
    pub fn calls(&self) -> &BTreeMap<u32, SentCall> {
        &self.calls
    }
}
