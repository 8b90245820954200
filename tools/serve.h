/*
 * serve.h — the subcommands of the albedo tool that live in their own files:
 * `albedo serve` (tools/serve*.c, HTTP server) and `albedo pull`
 * (tools/serve_pull.c, model download). Each takes the tool's whole argv
 * (argv[1] is the subcommand) and returns the process exit status.
 */
#ifndef ALBEDO_TOOLS_SERVE_H
#define ALBEDO_TOOLS_SERVE_H

int albedo_serve_main(int argc, char **argv);
int albedo_pull_main(int argc, char **argv);

#endif
