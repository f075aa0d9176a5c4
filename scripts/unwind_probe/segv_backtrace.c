/* LD_PRELOAD-able: on SIGSEGV/SIGBUS/SIGILL/SIGABRT print the faulting address, the module and
 * symbol holding the instruction pointer, and a native backtrace to stderr, then die with the
 * same signal. Built and used by scripts/unwind_probe/run.sh. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static char alt_stack[1 << 16];

static void say(const char* text) { (void)!write(2, text, strlen(text)); }

static void on_fatal_signal(int sig, siginfo_t* info, void* context) {
  char line[512];
  void* ip = (void*)((ucontext_t*)context)->uc_mcontext.gregs[REG_RIP];
  snprintf(line, sizeof line, "\n*** segv_backtrace: signal %d, fault address %p, ip %p\n", sig,
           info->si_addr, ip);
  say(line);
  Dl_info where;
  if (dladdr(ip, &where)) {
    snprintf(line, sizeof line, "*** ip in %s +%#lx, nearest symbol %s +%#lx\n",
             where.dli_fname ? where.dli_fname : "?",
             (unsigned long)((char*)ip - (char*)where.dli_fbase),
             where.dli_sname ? where.dli_sname : "?",
             where.dli_saddr ? (unsigned long)((char*)ip - (char*)where.dli_saddr) : 0UL);
    say(line);
  }
  void* frames[64];
  int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  stack_t ss = {.ss_sp = alt_stack, .ss_size = sizeof alt_stack, .ss_flags = 0};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fatal_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
  sigaction(SIGILL, &sa, NULL);
  sigaction(SIGABRT, &sa, NULL);
}
