//! The deployment lifecycle of one service as an explicit state machine.
