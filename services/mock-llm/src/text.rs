//! The deterministic completion text: which words a request gets, so tests anywhere in the
//! workspace can compute the exact text a stream must carry.
//!
//! The mapping from a request to its text:
//! 1. `prompt = prompt_text(contents of all messages, in order)`: directives removed, each
//!    content trimmed, empty ones skipped, joined with `"\n"`. The model name and the roles do
//!    not matter.
//! 2. `seed` = the `seed=` directive if present, else `MockLlmSettings::seed`.
//! 3. `n` = the `tokens=` directive if present, else `MockLlmSettings::default_tokens`, capped
//!    by `max_completion_tokens` / `max_tokens`.
//! 4. The streamed deltas are `completion_tokens(&prompt, seed, n)`, in order.
//!
//! This module is a contract with other crates' tests: changing the word list or the generator
//! changes every expected text, so treat it as frozen.

/// Common English words; the generator draws from these only, so text is always readable.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on",
    "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had",
    "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said",
    "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up",
    "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number",
    "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil",
    "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part",
    "over", "new", "sound", "take", "only", "little", "work", "know", "place", "year", "live",
    "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good",
    "sentence", "man", "think", "say", "great", "where", "help", "through", "much", "before",
    "line", "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came", "want",
    "show", "also", "around", "form", "three", "small", "set", "put", "end", "does", "another",
    "well", "large", "must", "big", "even", "such", "because", "turn", "here", "why", "ask",
    "went", "men", "read", "need", "land", "different", "home", "us", "move", "try", "kind",
    "hand", "picture", "again", "change", "off", "play", "spell", "air", "away", "animal", "house",
    "point", "page", "letter", "mother", "answer", "found", "study", "still", "learn", "should",
    "world", "high", "every", "near", "add", "food", "between", "own", "below", "country", "plant",
    "last", "school", "father", "keep", "tree", "never", "start", "city", "earth", "eye", "light",
    "thought", "head", "under", "story", "river", "dragon",
];

/// Shortest and longest sentence, in words.
const MIN_SENTENCE: u64 = 5;
const MAX_SENTENCE: u64 = 14;

/// The tokens of a completion: one word each, the first without and every other with a
/// leading space, so `concat()` reads naturally. Sentences start capitalized and end with a
/// period (the last sentence may be cut short by `count`).
///
/// Deterministic in `(prompt, seed, count)`, and `completion_tokens(p, s, n)` is a prefix of
/// `completion_tokens(p, s, n + k)`: token `i` never depends on `count`.
pub fn completion_tokens(prompt: &str, seed: u64, count: usize) -> Vec<String> {
    let mut rng = SplitMix64(fnv1a(prompt.as_bytes()) ^ seed);
    let mut tokens = Vec::with_capacity(count);
    let mut sentence_len = 0;
    let mut position = 0;
    let mut previous = usize::MAX;
    while tokens.len() < count {
        if position == sentence_len {
            sentence_len = MIN_SENTENCE + rng.below(MAX_SENTENCE - MIN_SENTENCE + 1);
            position = 0;
        }
        let mut index = rng.below(WORDS.len() as u64) as usize;
        // "the the" reads like a bug; draw again (still deterministic).
        if index == previous {
            index = rng.below(WORDS.len() as u64) as usize;
        }
        previous = index;
        let word = WORDS.get(index).copied().unwrap_or("the");

        let mut token = String::with_capacity(word.len() + 2);
        if !tokens.is_empty() {
            token.push(' ');
        }
        if position == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                token.extend(first.to_uppercase());
                token.push_str(chars.as_str());
            }
        } else {
            token.push_str(word);
        }
        if position + 1 == sentence_len {
            token.push('.');
        } else if position >= 2 && position + 2 < sentence_len && rng.below(8) == 0 {
            token.push(',');
        }
        tokens.push(token);
        position += 1;
    }
    tokens
}

/// The prompt the text is derived from: each message content with `[[mock …]]` directives
/// removed and surrounding whitespace trimmed; contents left empty are skipped; the rest are
/// joined with `"\n"`. Pass the contents of all request messages, in order.
pub fn prompt_text<I, S>(contents: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut prompt = String::new();
    for content in contents {
        let stripped = crate::directive::split(content.as_ref()).0;
        let trimmed = stripped.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !prompt.is_empty() {
            prompt.push('\n');
        }
        prompt.push_str(trimmed);
    }
    prompt
}

/// Prompt tokens as the mock counts them: whitespace-separated words.
pub fn count_prompt_tokens(prompt: &str) -> u32 {
    u32::try_from(prompt.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// FNV-1a, 64-bit: a tiny, frozen hash so the text never changes with a dependency update.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64: small, fast, and frozen (no `rand`, whose streams may change across releases).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (the modulo bias is irrelevant for picking words).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_list_has_no_duplicates_or_odd_characters() {
        let mut seen = std::collections::HashSet::new();
        for word in WORDS {
            assert!(seen.insert(word), "duplicate {word}");
            assert!(word.chars().all(|c| c.is_ascii_lowercase()), "{word}");
        }
        assert!(WORDS.len() >= 200);
    }

    #[test]
    fn frozen_output_for_a_known_prompt() {
        // Guards the contract: if this changes, every other crate's expected text changes.
        let text = completion_tokens("Tell me a story about a dragon", 0, 30).concat();
        assert_eq!(text, FROZEN_SAMPLE);
    }

    const FROZEN_SAMPLE: &str = "In can year word year are we sound her three, through, first \
        country. Work father back never get was us plant then must answer. Under out her because \
        been. School";

    #[test]
    fn prompt_text_strips_trims_and_joins() {
        let prompt = prompt_text(["  Be brief. ", "[[mock tokens=3]]", "Hi [[mock seed=1]]"]);
        assert_eq!(prompt, "Be brief.\nHi");
        assert_eq!(count_prompt_tokens(&prompt), 3);
    }
}
