//! OpenAI tokens a request used, as the upstream reported them.

/// The upstream's own token figures for one request. Kept apart because they are billed
/// apart: `cached` is part of `prompt`, `reasoning` part of `completion`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}
