//! One module per subcommand.
pub mod bench;
pub mod chart;
pub mod chat;
pub mod compare;
pub mod convert;
pub mod inspect;
pub mod options;
pub mod pope;
pub mod replay_route;
pub mod run;
pub mod serve;
