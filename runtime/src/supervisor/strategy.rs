//! Restart strategies: which children are restarted together when one of them must be
//! restarted (Erlang's `one_for_one`, `one_for_all`, `rest_for_one`).

use std::ops::Range;

/// Which siblings share a child's restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the child that exited is restarted.
    #[default]
    OneForOne,
    /// Every child is stopped (in reverse start order) and all are restarted (in start order).
    OneForAll,
    /// The child that exited and every child started after it are stopped (in reverse start
    /// order) and restarted (in start order); children started before it are left alone.
    RestForOne,
}

impl Strategy {
    /// The positions, in start order, of the children restarted together when the child at
    /// `failed` (one of `count` children) must be restarted.
    pub fn restart_group(self, failed: usize, count: usize) -> Range<usize> {
        match self {
            Strategy::OneForOne => failed..failed + 1,
            Strategy::OneForAll => 0..count,
            Strategy::RestForOne => failed..count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        assert_eq!(Strategy::OneForOne.restart_group(1, 4), 1..2);
        assert_eq!(Strategy::OneForAll.restart_group(1, 4), 0..4);
        assert_eq!(Strategy::RestForOne.restart_group(1, 4), 1..4);
        assert_eq!(Strategy::RestForOne.restart_group(3, 4), 3..4);
    }
}
