"""`dsmesh status --follow` and `dsmesh logs --follow` on the screen: a live progress bar (rich) on a
terminal - steps of max_steps, loss, tokens/s, MFU, ETA or the phase such as "compiling (42s)",
ticking between two reads of the status - and a plain line per change when the output is not a
terminal (a pipe, a CI log)."""
import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from dsmesh import format as fmt


class JobColumn(ProgressColumn):
    """loss | tokens/s | MFU | ETA, or the phase while no step is logged, computed at each refresh."""

    def render(self, task):
        job = task.fields.get("job") or {}
        now = time.time()
        parts = [part for part in fmt.progress_fields(job, now) if not part.startswith("step ")]
        phase = fmt.phase_text(job, now)
        if phase and job.get("state") == "running" and fmt.current_phase(job).get("phase") != "training":
            parts.insert(0, phase)  # loading, compiling, saving: say it, the bar stands still meanwhile
        elif job.get("state") == "running" and not parts:
            parts.append("starting")
        # one line whatever the terminal's width: the end is cut, not wrapped under the bar
        return Text(" | ".join(parts), no_wrap=True, overflow="ellipsis")


def stamp():
    return datetime.datetime.now().strftime("%H:%M:%S")


class StatusView:
    """Shows the statuses of a followed job; `with StatusView() as view: view.update(job)`."""

    def __init__(self, console=None):
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.progress = None
        self.task = None
        self.last_key = None

    def __enter__(self):
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                     JobColumn(), console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False

    def note(self, text):
        """A line of its own (a status that could not be read, a new run), above the bar."""
        (self.progress.console if self.progress else self.console).print(Text(f"[{stamp()}] {text}"))

    def update(self, job):
        job = job or {}
        key = (job.get("run_id"), job.get("state"), job.get("step"), fmt.current_phase(job).get("phase"))
        if not self.live:
            if key != self.last_key:
                self.console.print(Text(f"[{stamp()}] {fmt.status_line(job)}"), soft_wrap=True)
            self.last_key = key
            return
        description = job.get("run_id") or "job"
        if self.task is None or key[0] != (self.last_key or (None,))[0]:
            if self.task is not None:
                self.progress.stop_task(self.task)
            self.task = self.progress.add_task(description, total=fmt.max_steps(job), job=job)
        completed = job.get("step") or 0
        self.progress.update(self.task, description=description, total=fmt.max_steps(job), completed=completed,
                             job=job)
        self.last_key = key


def print_log_lines(console, lines):
    """Log lines as they are: no markup, no highlighting, no wrapping of long lines."""
    for line in lines:
        console.print(Text(line), soft_wrap=True, highlight=False)
