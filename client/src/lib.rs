//! The bdr backup client.
