//! Integration tests, one binary: the built `ticketflow` run as a user would, the
//! wire contract against golden files, and the pipeline against scripted providers.

mod helpers;

mod chaos;
mod config_cli;
mod contract;
mod corpus;
mod deploy;
mod dispatch;
mod eval_cli;
mod explain_cli;
mod kafka;
mod ledger_pg;
mod pipeline;
mod process_cli;
mod providers;
mod rabbitmq;
mod readme;
mod real_providers;
