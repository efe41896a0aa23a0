//! Everything on the upstream side: dialing, pooling, balancing.

pub mod dialer;
pub mod pool;
