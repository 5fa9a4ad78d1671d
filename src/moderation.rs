//! Our own moderation check, run once per ticket after a provider's content filter
//! refused it. A pass sends the ticket to the tier's bypass chain; a flag hands it
//! to a human. Provider filters over-refuse ("arrived with water damage"); this check
//! is what decides whether a refusal was justified.

use crate::settings::{ModerationMode, ModerationSettings};
use crate::ticket::{Role, Ticket};
use crate::triage::keywords::KeywordSet;

/// The result of the check, with the reason for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Flagged { reason: String },
}

/// The configured moderation check.
#[derive(Debug, Clone)]
pub struct Moderator {
    mode: ModerationMode,
    flag_words: KeywordSet,
}

impl Moderator {
    pub fn new(s: &ModerationSettings) -> Self {
        Moderator { mode: s.mode, flag_words: KeywordSet::new([("flag", s.flag_words.iter())]) }
    }

    /// Checks the customer's messages.
    pub fn check(&self, ticket: &Ticket) -> Verdict {
        match self.mode {
            ModerationMode::Local => {
                for m in ticket.messages.iter().filter(|m| m.role == Role::Customer) {
                    let lower = m.text.to_lowercase();
                    if let Some(word) = self.flag_words.first_match(&lower) {
                        return Verdict::Flagged { reason: format!("local rule list: `{word}`") };
                    }
                }
                Verdict::Passed
            }
        }
    }
}
