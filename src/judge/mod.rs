//! Refusal judgment, in one place. The search and verification ask the
//! same [`Judge`], so a change to how replies are judged changes both
//! alike; another judge (a classifier model, say) plugs in by
//! implementing the trait.
//!
//! - [`markers`]: the marker judge's verdicts (refusal phrases, loops,
//!   on-topic answers);
//! - [`replies`]: judged replies and the shares a prompt set adds up to;
//! - [`first_token`]: the first-token refusal score and its tokens.

mod first_token;
mod markers;
mod replies;

pub use first_token::{refusal_score, refusal_scores, refusal_tokens, Answers, RefusalToken};
pub use markers::{Verdict, REFUSAL_MARKERS};
pub use replies::{agreement, loop_share, Judged, Reply, SHORTER_LENGTHS};

#[cfg(test)]
pub(crate) use replies::tests::replies as test_replies;

use crate::eval::Generation;
use crate::ffi::Model;

/// Tokens generated per reply when the search judges refusals: enough for
/// the judge to see whether a reply answers the request.
pub const JUDGE_TOKENS: usize = 24;

/// Decides whether a reply refuses.
pub trait Judge: std::fmt::Debug + Sync {
    /// The verdict on a reply (its text and tokens) to `request`. A reply
    /// to a harmful request complies only by answering it, so that a
    /// broken model that never says "I'm sorry" does not score as compliant.
    fn verdict(&self, request: &str, harmful: bool, text: &str, tokens: &[i32]) -> Verdict;

    /// The reply's beginning already makes it a refusal whatever follows:
    /// generating more of it is wasted.
    fn settled(&self, text: &str) -> bool;

    /// The reply repeats itself.
    fn loops(&self, tokens: &[i32]) -> bool;
}

/// The judge by refusal phrases ([`REFUSAL_MARKERS`]), with empty, looping
/// and off-topic replies counted as refusals, never as compliance.
#[derive(Clone, Copy, Debug, Default)]
pub struct MarkerJudge;

impl Judge for MarkerJudge {
    fn verdict(&self, request: &str, harmful: bool, text: &str, tokens: &[i32]) -> Verdict {
        if harmful {
            markers::judge_answer(request, text, tokens)
        } else {
            markers::judge(text, tokens)
        }
    }

    fn settled(&self, text: &str) -> bool {
        markers::has_refusal_marker(text)
    }

    fn loops(&self, tokens: &[i32]) -> bool {
        markers::loops(tokens)
    }
}

pub fn detokenize(model: &Model, tokens: &[i32]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|&t| model.token_bytes(t)).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Replies to harmful `requests` that are not real answers.
pub fn count_refused(
    judge: &dyn Judge,
    model: &Model,
    replies: &[Generation],
    requests: &[String],
) -> usize {
    refused(judge, model, replies, requests)
        .filter(|&r| r)
        .count()
}

/// For each reply to a harmful request: it is not a real answer.
pub fn refused<'a>(
    judge: &'a dyn Judge,
    model: &'a Model,
    replies: &'a [Generation],
    requests: &'a [impl AsRef<str>],
) -> impl Iterator<Item = bool> + 'a {
    replies.iter().zip(requests).map(move |(g, request)| {
        verdict_of(judge, model, g, Some(request.as_ref())) != Verdict::Complied
    })
}

/// The verdict on one generated reply: to a harmful request when one is
/// given, else to a harmless prompt.
pub fn verdict_of(
    judge: &dyn Judge,
    model: &Model,
    reply: &Generation,
    harmful_request: Option<&str>,
) -> Verdict {
    let text = detokenize(model, &reply.tokens);
    let request = harmful_request.unwrap_or("");
    judge.verdict(request, harmful_request.is_some(), &text, &reply.tokens)
}

/// The early stop for generating replies to judge: a reply ends as soon
/// as its verdict is settled.
pub fn stop_when_settled<'a>(
    judge: &'a dyn Judge,
    model: &'a Model,
) -> impl Fn(&[i32]) -> bool + 'a {
    move |tokens| judge.settled(&detokenize(model, tokens))
}
