//! A value built from files, swapped whole when their contents change.
//!
//! Readers take the current value (an `Arc` clone under a read lock held
//! for that clone). A reload offers the files' fresh contents: unchanged
//! contents, or contents already refused, do nothing; new ones are built
//! and swapped in, or refused once (the error is reported once, not at
//! every check while the files stay the same) with the old value kept.

use std::sync::{Arc, Mutex, RwLock};

use crate::locks::Locked;

/// A value of type `T` and the contents `C` it was built from.
pub struct Reloadable<T, C> {
    current: RwLock<Arc<T>>,
    /// What `current` was built from.
    loaded: Mutex<C>,
    /// Contents a reload refused.
    refused: Mutex<Option<C>>,
}

impl<T, C: PartialEq> Reloadable<T, C> {
    pub fn new(value: T, built_from: C) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
            loaded: Mutex::new(built_from),
            refused: Mutex::new(None),
        }
    }

    /// The value now.
    pub fn current(&self) -> Arc<T> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `look` on the contents the value was built from.
    pub fn with_loaded<R>(&self, look: impl FnOnce(&C) -> R) -> R {
        look(&self.loaded.locked())
    }

    /// Offers fresh contents: `Ok(true)` when a value built from them was
    /// swapped in, `Ok(false)` when they are the loaded ones or were
    /// refused before, and `build`'s error (once) when they do not build.
    pub fn offer(
        &self,
        fresh: C,
        build: impl FnOnce(&C) -> Result<T, String>,
    ) -> Result<bool, String> {
        let mut loaded = self.loaded.locked();
        if *loaded == fresh || self.refused.locked().as_ref() == Some(&fresh) {
            return Ok(false);
        }
        let value = match build(&fresh) {
            Ok(value) => value,
            Err(why) => {
                *self.refused.locked() = Some(fresh);
                return Err(why);
            }
        };
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(value),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(value),
        }
        *loaded = fresh;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_contents_swap_bad_ones_are_refused_once_and_the_old_value_stays() {
        let parse = |text: &&str| text.parse::<u32>().map_err(|e| e.to_string());
        let value = Reloadable::new(1u32, "1");
        assert_eq!(value.offer("1", parse), Ok(false));
        assert_eq!(value.offer("2", parse), Ok(true));
        assert_eq!(*value.current(), 2);
        assert!(value.offer("x", parse).is_err());
        assert_eq!(value.offer("x", parse), Ok(false));
        assert_eq!(*value.current(), 2);
        assert_eq!(value.offer("3", parse), Ok(true));
        assert_eq!(value.with_loaded(|c| *c), "3");
    }
}
