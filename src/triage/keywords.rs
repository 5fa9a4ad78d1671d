//! Multilingual keyword matching shared by triage flags, the heuristic classifier,
//! the local moderation check and the simulated providers' content filter.
//!
//! One Aho-Corasick automaton per set scans the text once, whatever the number of
//! words. Words in scripts with spaces (Latin, Vietnamese) must stand as whole words,
//! so `sue` does not fire on "issue", and numbers as whole numbers, so `12315` does
//! not fire on order `#112315`; words in scripts without spaces (Chinese, Thai) match
//! anywhere, next to digits too (`拨打12315投诉`).

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

/// A set of named word groups, compiled once.
#[derive(Debug, Clone)]
pub struct KeywordSet {
    automaton: Option<AhoCorasick>,
    /// For each pattern: (group index, whether it must stand as a whole word).
    patterns: Vec<(usize, bool)>,
    groups: Vec<String>,
}

impl KeywordSet {
    /// Builds from `(group name, words)` pairs. Words are matched case-insensitively.
    pub fn new<'a, I, W>(groups: I) -> Self
    where
        I: IntoIterator<Item = (&'a str, W)>,
        W: IntoIterator<Item = &'a String>,
    {
        let mut names = Vec::new();
        let mut words = Vec::new();
        let mut patterns = Vec::new();
        for (gi, (name, list)) in groups.into_iter().enumerate() {
            names.push(name.to_owned());
            for w in list {
                let w = w.trim().to_lowercase();
                if w.is_empty() {
                    continue;
                }
                // Letters of spaced scripts and digits stand as whole words and
                // numbers: `12315` (a complaints hotline) is not in order `#112315`.
                let whole_word = w.chars().any(|c| c.is_alphanumeric() && !is_unspaced_script(c));
                patterns.push((gi, whole_word));
                words.push(w);
            }
        }
        let automaton = if words.is_empty() {
            None
        } else {
            // Overlapping search needs the standard match kind; patterns are few and small,
            // so building cannot fail in practice, and a failure would only disable matching.
            // A DFA costs more memory than the default NFA but scans several times faster;
            // keyword lists are small, and every ticket is scanned more than once.
            AhoCorasick::builder().match_kind(MatchKind::Standard).kind(Some(AhoCorasickKind::DFA)).build(&words).ok()
        };
        KeywordSet { automaton, patterns, groups: names }
    }

    /// Whether the set has no word at all (nothing can match).
    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// Number of hits per group for an already lower-cased text.
    pub fn count(&self, lower: &str) -> Vec<usize> {
        let mut counts = vec![0; self.groups.len()];
        let Some(ac) = &self.automaton else {
            return counts;
        };
        for m in ac.find_overlapping_iter(lower) {
            let (group, whole_word) = self.patterns[m.pattern().as_usize()];
            if whole_word && !at_word_boundaries(lower, m.start(), m.end()) {
                continue;
            }
            counts[group] += 1;
        }
        counts
    }

    /// Names of the groups with at least one hit.
    pub fn hits<'s>(&'s self, lower: &str) -> impl Iterator<Item = &'s str> + 's {
        let counts = self.count(lower);
        self.groups.iter().zip(counts).filter(|(_, c)| *c > 0).map(|(g, _)| g.as_str())
    }

    /// The first word of the set found in the text, if any (for messages).
    pub fn first_match<'t>(&self, lower: &'t str) -> Option<&'t str> {
        let ac = self.automaton.as_ref()?;
        ac.find_overlapping_iter(lower)
            .find(|m| {
                let (_, whole) = self.patterns[m.pattern().as_usize()];
                !whole || at_word_boundaries(lower, m.start(), m.end())
            })
            .map(|m| &lower[m.start()..m.end()])
    }

    pub fn groups(&self) -> &[String] {
        &self.groups
    }
}

/// Scripts written without spaces between words, where substring matching is right.
fn is_unspaced_script(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0E7F      // Thai
        | 0x0E80..=0x0EFF    // Lao
        | 0x1780..=0x17FF    // Khmer
        | 0x3040..=0x30FF    // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified
        | 0xF900..=0xFAFF    // CJK compatibility
        | 0xAC00..=0xD7AF    // Hangul
    )
}

fn at_word_boundaries(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() && !is_unspaced_script(c));
    !is_word(before) && !is_word(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(words: &[&str]) -> KeywordSet {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        KeywordSet::new([("g", words.iter())])
    }

    #[test]
    fn latin_words_need_word_boundaries() {
        let s = set(&["sue", "legal action"]);
        assert_eq!(s.count("there is an issue"), vec![0]);
        assert_eq!(s.count("i will sue you"), vec![1]);
        assert_eq!(s.count("i'll take legal action."), vec![1]);
    }

    #[test]
    fn numbers_need_number_boundaries_in_every_script() {
        let s = set(&["12315"]);
        assert_eq!(s.count("where is my order #112315?"), vec![0]);
        assert_eq!(s.count("order 123150 and 912315"), vec![0]);
        assert_eq!(s.count("i will call 12315 today"), vec![1]);
        assert_eq!(s.count("我要打12315投诉"), vec![1]);
        assert_eq!(s.count("订单号1123156还没到"), vec![0]);
    }

    #[test]
    fn cjk_and_thai_match_anywhere() {
        let s = set(&["律师", "ทนาย"]);
        assert_eq!(s.count("我要找律师起诉你们"), vec![1]);
        assert_eq!(s.count("ผมจะปรึกษาทนายความ"), vec![1]);
    }

    #[test]
    fn words_are_case_insensitive_and_vietnamese_works() {
        let s = set(&["Luật Sư"]);
        assert_eq!(s.count(&"Tôi sẽ nhờ LUẬT SƯ".to_lowercase()), vec![1]);
    }
}
