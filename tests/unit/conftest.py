"""Set-up for the unit tests of the deepspeed_* modules and their module_utils.

The modules import their logic as `ansible.module_utils.ds_planner` etc. (ansible.cfg points
module_utils at plugins/module_utils, and AnsiballZ ships the files with the module). The tests
import it under the same names: appending plugins/module_utils to the `ansible.module_utils`
package path is what Ansible's own loader does, so no test-only import path exists. Helpers
shared by the tests are in ds_testlib.py.
"""

from pathlib import Path

import ansible.module_utils

_MODULE_UTILS = str(Path(__file__).resolve().parents[2] / "plugins" / "module_utils")
if _MODULE_UTILS not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(_MODULE_UTILS)
