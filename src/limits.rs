//! Input limits, checked before anything is stored.

use crate::error::{Error, Result};

/// Sizes a node accepts (`--max-key-bytes`, `--max-value-bytes`,
/// `--max-batch-items`, `--max-page-entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most items in one batch call.
    pub max_batch_items: usize,
    /// Most keys in one page of a range listing.
    pub max_page_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: crate::config::DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: crate::config::DEFAULT_MAX_VALUE_BYTES,
            max_batch_items: crate::config::DEFAULT_MAX_BATCH_ITEMS,
            max_page_entries: crate::config::DEFAULT_MAX_PAGE_ENTRIES,
        }
    }
}

impl Limits {
    /// Refuses a batch call of more than `--max-batch-items` items, before
    /// any of them is looked at. `what` names the items ("reads").
    pub fn check_batch(&self, items: usize, what: &str) -> Result<()> {
        if items > self.max_batch_items {
            return Err(Error::InvalidArgument(format!(
                "{items} {what} in one call; the limit is {} (--max-batch-items): split the batch",
                self.max_batch_items
            )));
        }
        Ok(())
    }

    /// The entries one page of a listing holds: `asked` (0: no preference),
    /// capped at `--max-page-entries`.
    pub fn page_entries(&self, asked: u32) -> usize {
        match asked as usize {
            0 => self.max_page_entries,
            asked => asked.min(self.max_page_entries),
        }
    }

    pub fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "key is empty; a key must be 1 to {} bytes of UTF-8",
                self.max_key_bytes
            )));
        }
        if key.len() > self.max_key_bytes {
            return Err(Error::InvalidArgument(format!(
                "key is {} bytes; the limit is {} bytes (--max-key-bytes)",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    pub fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.max_value_bytes {
            return Err(Error::InvalidArgument(format!(
                "value is {} bytes; the limit is {} bytes (--max-value-bytes)",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_pages_are_capped_by_their_flags() {
        let limits = Limits {
            max_batch_items: 1024,
            max_page_entries: 100,
            ..Limits::default()
        };
        assert!(limits.check_batch(1024, "reads").is_ok());
        let error = limits.check_batch(1025, "reads").expect_err("over");
        assert!(
            error
                .to_string()
                .contains("limit is 1024 (--max-batch-items)"),
            "{error}"
        );
        assert_eq!(limits.page_entries(0), 100);
        assert_eq!(limits.page_entries(7), 7);
        assert_eq!(limits.page_entries(u32::MAX), 100);
    }

    #[test]
    fn keys_must_be_1_to_max_bytes() {
        let limits = Limits::default();
        assert!(limits.check_key("k").is_ok());
        assert!(limits.check_key(&"k".repeat(1024)).is_ok());
        let error = limits.check_key(&"k".repeat(1025)).expect_err("too long");
        assert!(error.to_string().contains("limit is 1024 bytes"), "{error}");
        assert!(
            limits
                .check_key("")
                .expect_err("empty")
                .to_string()
                .contains("empty")
        );
        // The limit counts bytes, not characters.
        assert!(limits.check_key(&"é".repeat(513)).is_err());
    }

    #[test]
    fn values_up_to_the_limit() {
        let limits = Limits::default();
        assert!(limits.check_value(&[]).is_ok());
        assert!(limits.check_value(&vec![0; 1024 * 1024]).is_ok());
        let error = limits
            .check_value(&vec![0; 1024 * 1024 + 1])
            .expect_err("too big");
        assert!(error.to_string().contains("--max-value-bytes"), "{error}");
    }
}
