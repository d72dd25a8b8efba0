//! Hinted handoff: writes held for a replica that is down.
//!
//! When a replica of a key is down (believed down by the failure detector, or
//! failing the write), the coordinator asks the next live node clockwise
//! beyond the key's preference list to keep the write as a *hint* for that
//! replica. The hint holder persists it and, once its failure detector sees
//! the replica up again, delivers it (an ordinary write-if-newer) and deletes
//! it. Hints are bounded in number (`--max-hints`), bytes
//! (`--max-hint-bytes`) and age (`--max-hint-age-secs`): a replica down
//! longer than that is brought up to date by anti-entropy instead.
//!
//! Nothing blocks the queue of a target: a hint that cannot be read or
//! decoded, whose version is beyond the skew bound, or that the target
//! rejects (it answers INVALID_ARGUMENT) is dropped with a log line, and
//! anti-entropy repairs what it carried. Only a target that cannot be
//! reached pauses delivery, to be retried the next round. Opening the store
//! lists hint ids and sizes only ([`Storage::hint_ids`]): start-up reads no
//! hint, however many are held.
//!
//! Hints never count towards W for ONE, QUORUM or ALL — a hint is not a
//! replica a read would consult, so counting it would break the no-stale-read
//! guarantee. Only `CONSISTENCY_ANY` accepts a stored hint as enough.

mod delivery;
mod hinter;
mod store;

pub use delivery::HintDelivery;
pub use hinter::Hinter;
pub use store::{Hint, HintBounds, HintStore};
